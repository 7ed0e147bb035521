"""Check an MLflow tracking URI before a stage starts.

MLflow's client retries an unreachable server for minutes before it fails, and a bundle stage
only talks to the server when its MLflow handler starts, after the data are set up. Every
stage therefore calls :func:`check_tracking_uri` in its ``initialize`` block
(``$scripts.tracking.check_tracking_uri(@tracking_uri)``): an ``http(s)://`` URI that does not
answer stops the stage at once, with a message naming the URI and the option, before any data
(in particular any private data) is read.

Local stores (``sqlite:///...``, ``file:///...``, a plain path) and URIs whose connection
MLflow resolves itself (``databricks``, ``databricks://PROFILE``, ``databricks-uc``, with
``DATABRICKS_HOST`` / ``DATABRICKS_TOKEN`` or a ``~/.databrickscfg`` profile) pass unchanged.

    python -m scripts.tracking http://mlflow.example.org:5000   # exit status 0 if it answers
"""

from __future__ import annotations

import logging
import os
import ssl
import sys
import urllib.error
import urllib.request
from urllib.parse import urlsplit

from scripts.errors import BundleError

logger = logging.getLogger(__name__)

DEFAULT_TIMEOUT = 10.0
HEALTH_ENDPOINT = "health"  # MLflow's tracking server answers GET /health with "OK"
OPTION = "--tracking_uri"


class TrackingServerError(BundleError, RuntimeError):
    """An http(s) tracking URI that does not answer (or answers with a server error)."""


def _ssl_context() -> ssl.SSLContext | None:
    """TLS settings of MLflow's own client (``MLFLOW_TRACKING_INSECURE_TLS``, ``MLFLOW_TRACKING_SERVER_CERT_PATH``)."""
    if os.environ.get("MLFLOW_TRACKING_INSECURE_TLS", "").lower() == "true":
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        return context
    cert = os.environ.get("MLFLOW_TRACKING_SERVER_CERT_PATH")
    return ssl.create_default_context(cafile=cert) if cert else None


def _auth_header() -> dict[str, str]:
    """The credentials MLflow's client would send (``MLFLOW_TRACKING_TOKEN`` or username/password)."""
    import base64

    token = os.environ.get("MLFLOW_TRACKING_TOKEN")
    if token:
        return {"Authorization": f"Bearer {token}"}
    user, password = os.environ.get("MLFLOW_TRACKING_USERNAME"), os.environ.get("MLFLOW_TRACKING_PASSWORD")
    if user and password:
        return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}
    return {}


def check_tracking_uri(uri: str, timeout: float = DEFAULT_TIMEOUT) -> str:
    """Return ``uri`` if MLflow can log to it; raise a clear error if an http(s) server does not answer.

    For ``http://`` and ``https://`` URIs, a GET on the server's health endpoint (``URI/health``)
    must get an HTTP answer within ``timeout`` seconds. A connection failure, a timeout or a
    5xx status is an error; a 4xx status (e.g. an authenticating proxy, or a server without
    the endpoint) means the server answers, so the URI is accepted with a warning and MLflow's
    client deals with it. Every other scheme (``sqlite``, ``file``, a local path,
    ``databricks``...) is returned unchanged.

    Args:
        uri: the stage's ``tracking_uri``.
        timeout: seconds to wait for the answer.

    Returns:
        ``uri``, unchanged (so that a config can use the call's value).

    Raises:
        TrackingServerError: the server does not answer, naming the URI, the option and the cause.
    """
    text = str(uri).strip() if uri is not None else ""
    scheme = urlsplit(text).scheme.lower()
    if scheme not in ("http", "https"):
        return uri
    url = text.rstrip("/") + "/" + HEALTH_ENDPOINT
    fix = (
        f"start the server (e.g. `mlflow server --host 127.0.0.1 --port 5000`), correct {OPTION} "
        f"(expected form: http(s)://HOST:PORT[/PATH] of an MLflow tracking server), or log to a local store "
        f"with {OPTION} sqlite:///ABSOLUTE/PATH/mlruns.db"
    )
    request = urllib.request.Request(url, headers=_auth_header(), method="GET")
    try:
        with urllib.request.urlopen(request, timeout=timeout, context=_ssl_context()) as response:
            status = response.status
    except urllib.error.HTTPError as e:
        status = e.code
    except (urllib.error.URLError, OSError, ValueError) as e:
        reason = getattr(e, "reason", e)
        raise TrackingServerError(
            f"MLflow tracking server {text} ({OPTION}) does not answer: GET {url} failed within {timeout:g} s "
            f"({reason}). Nothing was run; {fix}"
        ) from e
    if status >= 500:
        raise TrackingServerError(
            f"MLflow tracking server {text} ({OPTION}) answered GET {url} with HTTP {status}: the server is not "
            f"healthy. Nothing was run; {fix}"
        )
    if status >= 400:
        logger.warning(
            f"MLflow tracking server {text}: GET {url} answered HTTP {status}; continuing (MLflow's client "
            f"decides whether it can log there)"
        )
    else:
        logger.info(f"MLflow tracking server {text} answers")
    return uri


def main(argv: list[str] | None = None) -> int:
    """Command line: ``python -m scripts.tracking URI [TIMEOUT]``; exit status 1 with the error if it fails.

    Args:
        argv: command-line arguments (default ``sys.argv[1:]``).

    Returns:
        the exit status.
    """
    args = sys.argv[1:] if argv is None else argv
    if not 1 <= len(args) <= 2:
        print("usage: python -m scripts.tracking TRACKING_URI [TIMEOUT_SECONDS]", file=sys.stderr)
        return 2
    try:
        check_tracking_uri(args[0], float(args[1]) if len(args) > 1 else DEFAULT_TIMEOUT)
    except TrackingServerError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"{args[0]}: OK")
    return 0


if __name__ == "__main__":
    sys.exit(main())
