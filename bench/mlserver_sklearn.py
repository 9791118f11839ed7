"""MLServer's scikit-learn runtime for the baseline, run inside MLServer's own virtualenv.

``bench.mlserver`` copies this file beside a scikit-learn model's ``model-settings.json``
(MLServer puts that folder on ``sys.path`` when it loads the model) and names
``bench_sklearn_runtime.SKLearnModel`` as the implementation. It does what MLServer's
``mlserver-sklearn`` 1.7.1 runtime does by default, which ``bench/mlserver.lock`` does not
install: load the joblib file the settings' ``uri`` names, decode the request with
``NumpyRequestCodec``, answer ``predict`` with ``NumpyCodec``. The gateway's environment has no
MLServer: this module is never imported there.
"""

from __future__ import annotations

from typing import Any

import joblib
from mlserver import MLModel, types  # type: ignore[import-not-found]
from mlserver.codecs import NumpyCodec, NumpyRequestCodec  # type: ignore[import-not-found]
from mlserver.utils import get_model_uri  # type: ignore[import-not-found]

__all__ = ["SKLearnModel"]


class SKLearnModel(MLModel):  # type: ignore[misc]
    """A scikit-learn estimator from a joblib file, answering its labels as ``predict``."""

    async def load(self) -> bool:
        self._model = joblib.load(await get_model_uri(self._settings))
        return True

    async def predict(self, payload: Any) -> Any:
        rows = self.decode_request(payload, default_codec=NumpyRequestCodec)
        return types.InferenceResponse(
            model_name=self.name, model_version=self.version,
            outputs=[NumpyCodec.encode_output(name="predict",
                                              payload=self._model.predict(rows))])
