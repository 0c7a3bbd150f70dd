"""SIGTERM drains in-flight requests (server in a subprocess), and TLS / mTLS round trips."""

from __future__ import annotations

import datetime as dt
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import grpc
import pytest
from test_server_helpers import code_of, running_server, write_fake_version

from recsys.v1 import recommender_pb2 as pb
from recsys.v1 import recommender_pb2_grpc as pb_grpc

TESTS = Path(__file__).resolve().parent

SERVER_SCRIPT = textwrap.dedent(
    """
    import sys
    from server.app import create_server, serve_until_signal
    from test_server_helpers import fake_loader, settings

    app, port = create_server("127.0.0.1:0", settings(sys.argv[1], warmup_queries=0), loader=fake_loader)
    app.start()
    print(port, flush=True)
    serve_until_signal(app, grace_s=5.0)
    print("drained", flush=True)
    """
)


def test_sigterm_drains_in_flight_requests(tmp_path):
    write_fake_version(tmp_path, "v1", delay_s=1.0)  # every search takes 1 s: requests are surely in flight
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen([sys.executable, "-c", SERVER_SCRIPT, str(tmp_path)], stdout=subprocess.PIPE,
                            text=True, env=env)
    try:
        port = int(proc.stdout.readline())
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            stub = pb_grpc.RecommenderStub(ch)
            grpc.channel_ready_future(ch).result(timeout=10)
            results: list[str] = []

            def call(i: int) -> None:
                code, _ = code_of(stub.Recommend, pb.RecommendRequest(user_id=f"u{i}", k=3), timeout=10)
                results.append(code.name)

            threads = [threading.Thread(target=call, args=(i,)) for i in range(3)]
            for t in threads:
                t.start()
            time.sleep(0.4)  # the three requests are now inside the 1 s search
            t_term = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            for t in threads:
                t.join()
            # the in-flight requests finished normally, after the signal
            assert results == ["OK", "OK", "OK"]
            assert time.monotonic() - t_term > 0.3
            # new calls are refused while/after draining
            code, _ = code_of(stub.Recommend, pb.RecommendRequest(user_id="u1", k=3), timeout=2)
            assert code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
        assert proc.wait(timeout=10) == 0
        assert proc.stdout.read().strip() == "drained"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _cert(common_name: str, *, issuer_key=None, issuer_name=None, ca: bool = False):
    """A certificate for ``common_name`` (SAN localhost + 127.0.0.1), self-signed unless an issuer is given."""
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = dt.datetime.now(dt.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(issuer_name or name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName(
            [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        .sign(issuer_key or key, hashes.SHA256())
    )
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    return cert.public_bytes(serialization.Encoding.PEM), key_pem, key, name


def test_tls_and_mtls_round_trip(tmp_path):
    pytest.importorskip("cryptography")
    from recsys.client import RecommenderClient, RecommenderError

    cert, key, _, _ = _cert("localhost")
    ca_cert, _, ca_key, ca_name = _cert("test-ca", ca=True)
    client_cert, client_key, _, _ = _cert("client", issuer_key=ca_key, issuer_name=ca_name)
    files = {}
    for name, data in {"cert": cert, "key": key, "ca": ca_cert, "ccert": client_cert, "ckey": client_key}.items():
        files[name] = tmp_path / f"{name}.pem"
        files[name].write_bytes(data)
    models = tmp_path / "models"
    write_fake_version(models, "v1")

    with running_server(models, tls_cert=str(files["cert"]), tls_key=str(files["key"])) as (_app, target):
        port = target.rsplit(":", 1)[1]
        with RecommenderClient(f"localhost:{port}", tls_ca=files["cert"], timeout=5) as client:
            assert client.recommend("u1", k=3).model_version == "v1"
        with RecommenderClient(f"localhost:{port}", timeout=2, max_attempts=1) as plain:
            with pytest.raises(RecommenderError) as e:
                plain.recommend("u1", k=3)  # plaintext client against a TLS server
            assert e.value.code == grpc.StatusCode.UNAVAILABLE

    with running_server(models, tls_cert=str(files["cert"]), tls_key=str(files["key"]),
                        tls_client_ca=str(files["ca"])) as (_app, target):
        port = target.rsplit(":", 1)[1]
        with RecommenderClient(f"localhost:{port}", tls_ca=files["cert"], tls_cert=files["ccert"],
                               tls_key=files["ckey"], timeout=5) as client:
            assert client.recommend("u1", k=3).model_version == "v1"
        with RecommenderClient(f"localhost:{port}", tls_ca=files["cert"], timeout=2, max_attempts=1) as anon:
            with pytest.raises(RecommenderError) as e:
                anon.recommend("u1", k=3)  # mTLS: no client certificate, no service
            assert e.value.code == grpc.StatusCode.UNAVAILABLE
