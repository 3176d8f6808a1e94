"""Tracking stores the user points at: an unknown URI, two processes creating one sqlite store at once, a server
behind a token or TLS (the pre-flight check honours MLflow's own client settings)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from cifar_mlflow.errors import TrackingError
from cifar_mlflow.tracking.store import check_tracking_server
from tests.conftest import TINY, child_env, cli_args, one_line


@pytest.fixture(scope="module", autouse=True)
def store(module_store):
    """One store for the module (every test's, so none falls back to ./mlflow.db)."""
    return module_store


@pytest.fixture
def tracking_uri(store, monkeypatch):
    """Point this process at another tracking URI for one test (the module's store is set back afterwards)."""
    import mlflow

    def point(uri: str) -> None:
        mlflow.set_tracking_uri(None)  # the store fixture's global URI would win over the variable
        monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)

    yield point
    mlflow.set_tracking_uri(store.uri)


def test_unknown_tracking_uri_is_one_line_before_any_work(tracking_uri):
    """It was a 63-line traceback, after data preparation."""
    tracking_uri("foo://bar")
    assert one_line(cli_args({**TINY, "dataset": "synthetic"})) == (
        "MLFLOW_TRACKING_URI='foo://bar' is not a tracking store MLflow can open (no store for its scheme); use "
        "sqlite:///<file>, postgresql://, mysql:// or http(s)://<server>"
    )


_OPEN_STORE_AT = """
import sys, time
import mlflow
from cifar_mlflow.tracking import store
start = float(sys.argv[1])
while time.time() < start:
    time.sleep(0.001)
store.check_tracking_server()                 # what each entry point does first
mlflow.MlflowClient().search_experiments()    # then its run
print("ok")
"""


def test_two_runs_at_once_into_an_empty_folder_both_open_the_store(tmp_path):
    """Two processes creating one sqlite store at once both ran MLflow's table creation, and one died
    ("duplicate column name: step"): the store is now created under a lock, by whichever comes first."""
    import time

    env = child_env(MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path / 'mlflow.db'}")
    start = str(time.time() + 8)  # both past their imports, then at the same instant
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _OPEN_STORE_AT, start],
            cwd=tmp_path,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    results = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [err[-1500:] for _, err in results]
    assert [out.split() for out, _ in results] == [["ok"], ["ok"]]


@pytest.fixture
def auth_server(tmp_path):
    """A stand-in MLflow server on 127.0.0.1, over HTTPS with a self-signed certificate (and over plain HTTP),
    that answers the experiments search only with `Authorization: Bearer s3cret`."""
    import datetime
    import http.server
    import ipaddress
    import json
    import ssl
    import threading

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    (tmp_path / "cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (tmp_path / "key.pem").write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            ok = self.headers.get("Authorization") == "Bearer s3cret"
            body = json.dumps({"experiments": []} if ok else {"error_code": "UNAUTHENTICATED"}).encode()
            self.send_response(200 if ok else 401)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    servers = {}
    for scheme in ("http", "https"):
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        if scheme == "https":
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(tmp_path / "cert.pem", tmp_path / "key.pem")
            server.socket = context.wrap_socket(server.socket, server_side=True)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers[scheme] = (server, f"{scheme}://127.0.0.1:{server.server_address[1]}")
    yield {scheme: uri for scheme, (_, uri) in servers.items()}, tmp_path / "cert.pem"
    for server, _ in servers.values():
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize(
    "scheme, env, message",
    [
        ("http", {"MLFLOW_TRACKING_TOKEN": "s3cret"}, None),
        (
            "http",
            {"MLFLOW_TRACKING_TOKEN": "wrong"},
            "tracking server {uri} refused the token in MLFLOW_TRACKING_TOKEN (HTTP 401)",
        ),
        (
            "https",
            {"MLFLOW_TRACKING_TOKEN": "s3cret"},
            "tracking server {uri} is unreachable (its TLS certificate is not trusted: set MLFLOW_TRACKING_SERVER_CERT_PATH "
            "to its CA bundle, or MLFLOW_TRACKING_INSECURE_TLS=true); start it, or point MLFLOW_TRACKING_URI at one that "
            "is up",
        ),
        ("https", {"MLFLOW_TRACKING_TOKEN": "s3cret", "MLFLOW_TRACKING_SERVER_CERT_PATH": "{cert}"}, None),
        ("https", {"MLFLOW_TRACKING_TOKEN": "s3cret", "MLFLOW_TRACKING_INSECURE_TLS": "true"}, None),
    ],
    ids=["token", "wrong-token", "untrusted-tls", "cert-path", "insecure-tls"],
)
def test_server_check_uses_mlflows_own_client_settings(auth_server, tracking_uri, monkeypatch, scheme, env, message):
    """check_tracking_server built its own request with only username/password: a token or TLS settings that
    every later MLflow call honours were ignored there."""
    uris, cert = auth_server
    tracking_uri(uris[scheme])
    for key, value in env.items():
        monkeypatch.setenv(key, value.format(cert=cert))
    if message is None:
        check_tracking_server()
    else:
        with pytest.raises(TrackingError) as err:
            check_tracking_server()
        assert str(err.value) == message.format(uri=uris[scheme])
