"""Protocol adapters: each decodes its wire format into one pipeline call and encodes the
answer back (``GET /predict``, ``/v1``, the Open Inference Protocol ``/v2``)."""
