"""Contract tests: the fence around what ``gateway/`` borrows from the insides of uvicorn,
prometheus-client and redis-py (STYLE 15, DESIGN "Doors"). Fast and in-process: no server, no
network, no Redis. ``fence.py`` holds the checking; each ``test_<dependency>.py`` holds that
dependency's table and the behaviours checked by running its code."""
