"""Infer all 150 Iris rows through the gateway with the stock Triton HTTP client.

Usage: python examples/tritonclient_iris.py [HOST:PORT]   (default 127.0.0.1:8000)
Exits 0 when the gateway's labels equal scikit-learn's own for every row.
"""

from __future__ import annotations

import sys

import numpy as np
import tritonclient.http as httpclient
from sklearn.datasets import load_iris

from model_store.demo import train_iris


def main(url: str = "127.0.0.1:8000") -> int:
    client = httpclient.InferenceServerClient(url)
    if not (client.is_server_live() and client.is_server_ready() and client.is_model_ready("iris")):
        print("gateway not ready", file=sys.stderr)
        return 1
    meta = client.get_model_metadata("iris")
    print(f"model {meta['name']} versions {meta['versions']} inputs {meta['inputs']}")
    rows = np.asarray(load_iris().data, dtype=np.float64)
    inp = httpclient.InferInput("input", list(rows.shape), "FP64")
    inp.set_data_from_numpy(rows)  # binary tensor data, the client's default
    result = client.infer("iris", [inp])
    labels = [b.decode() for b in result.as_numpy("label")]
    expected = train_iris().predict(rows).tolist()
    same = sum(a == b for a, b in zip(labels, expected, strict=True))
    print(f"{same}/{len(rows)} labels equal scikit-learn's")
    return 0 if same == len(rows) else 1


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:2]))
