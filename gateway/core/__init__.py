"""The inference core: keys, single-flight, micro-batcher, model runner and the pipeline
that ties them together on blocks of rows."""
