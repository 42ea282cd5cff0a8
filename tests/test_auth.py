"""Shared-token authentication and TLS: real selectors on 127.0.0.1 with a token, TLS, or both."""

from __future__ import annotations

import datetime
import hmac
import ipaddress
import itertools
import logging
import time
from types import SimpleNamespace

import grpc
import pytest
import torch
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from colm_client.channel import TLS_CA_ENV, TOKEN_FILE_ENV, open_channel
from colm_client.status import main as status_main
from colm_client.status import serving, status
from colm_client.stream import CoresetStream, CoresetStreamError
from colm_client.sync import AdapterSync
from colm_server.config import load_config
from colm_server.service.server import SelectorServer
from colm_stream.train import parse_args, train
from colm_wire.adapter import adapter_chunks
from colm_wire.proto import selector_pb2 as pb
from colm_wire.proto import selector_pb2_grpc as pb_grpc
from conftest import lora_model
from test_service import make_config, target

TOKEN = "tok-3f9a1c77e2b04d58"


# --- a throwaway CA and a server certificate for 127.0.0.1 / localhost -----------------------------

def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _certificate(subject: str, key, issuer: str, issuer_key, *, ca: bool) -> x509.Certificate:
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (x509.CertificateBuilder().subject_name(_name(subject)).issuer_name(_name(issuer))
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(minutes=5))
               .not_valid_after(now + datetime.timedelta(days=1))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=0 if ca else None), critical=True))
    if ca:
        builder = builder.add_extension(x509.KeyUsage(
            digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
            key_encipherment=False, data_encipherment=False, key_agreement=False, encipher_only=False,
            decipher_only=False), critical=True)
    else:
        builder = (builder
                   .add_extension(x509.SubjectAlternativeName([
                       x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                       critical=False)
                   .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False))
    return builder.sign(issuer_key, hashes.SHA256())


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> SimpleNamespace:
    """Paths of ca.pem (trusted), other-ca.pem (not the server's), server.pem and server.key."""
    folder = tmp_path_factory.mktemp("pki")
    ca_key, other_key, server_key = (ec.generate_private_key(ec.SECP256R1()) for _ in range(3))
    ca = _certificate("colm test CA", ca_key, "colm test CA", ca_key, ca=True)
    other = _certificate("another CA", other_key, "another CA", other_key, ca=True)
    server = _certificate("selector", server_key, "colm test CA", ca_key, ca=False)
    paths = SimpleNamespace(ca=folder / "ca.pem", other_ca=folder / "other-ca.pem",
                            cert=folder / "server.pem", key=folder / "server.key")
    paths.ca.write_bytes(_pem(ca))
    paths.other_ca.write_bytes(_pem(other))
    paths.cert.write_bytes(_pem(server))
    paths.key.write_bytes(server_key.private_bytes(serialization.Encoding.PEM,
                                                   serialization.PrivateFormat.PKCS8,
                                                   serialization.NoEncryption()))
    return SimpleNamespace(**{k: str(v) for k, v in vars(paths).items()})


# --- selectors: token only, TLS only, both ----------------------------------------------------------

@pytest.fixture(scope="module")
def token_file(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("secret") / "token"
    path.write_text(TOKEN + "\n")  # stripped when read
    path.chmod(0o600)
    return str(path)


def start_selector(folder, **service) -> SelectorServer:
    overrides = {"service.world_size": 1, **{f"service.{k}": v for k, v in service.items()}}
    srv = SelectorServer(make_config(folder, **overrides))
    srv.start()
    return srv


@pytest.fixture(scope="module")
def token_server(tmp_path_factory, token_file):
    srv = start_selector(tmp_path_factory.mktemp("token"), auth_token_file=token_file)
    yield srv
    srv.stop(grace=1)


@pytest.fixture(scope="module")
def tls_server(tmp_path_factory, pki):
    srv = start_selector(tmp_path_factory.mktemp("tls"), tls_cert=pki.cert, tls_key=pki.key)
    yield srv
    srv.stop(grace=1)


@pytest.fixture(scope="module")
def tls_token_server(tmp_path_factory, pki, token_file):
    srv = start_selector(tmp_path_factory.mktemp("tls-token"), tls_cert=pki.cert, tls_key=pki.key,
                         auth_token_file=token_file)
    yield srv
    srv.stop(grace=1)


def batches(srv, n: int = 2, **credentials) -> list:
    stream = CoresetStream(target(srv), rank=0, world_size=1, **credentials)
    try:
        return list(itertools.islice(iter(stream), n))
    finally:
        stream.close()


def call(channel: grpc.Channel, method: str):
    """One call of ``method`` with a minimal valid request."""
    stub = pb_grpc.SelectorStub(channel)
    if method == "Stream":
        join = pb.StreamRequest(join=pb.Join(job_id="default", rank=0, world_size=1))
        return next(stub.Stream(iter([join]), timeout=10))
    if method == "PushAdapter":
        return stub.PushAdapter(adapter_chunks({"w": torch.zeros(2)}, "default", 0), timeout=10)
    if method == "Status":
        return stub.Status(pb.StatusRequest(), timeout=10)
    request = reflection_pb2.ServerReflectionRequest(list_services="")
    return next(reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(iter([request]),
                                                                                       timeout=10))


# --- the token --------------------------------------------------------------------------------------

@pytest.mark.parametrize("method", ["Stream", "PushAdapter", "Status", "reflection"])
@pytest.mark.parametrize("token", ["", "wrong-token"], ids=["no-token", "wrong-token"])
def test_calls_without_the_right_token_are_unauthenticated(token_server, method, token, caplog):
    caplog.set_level(logging.DEBUG)
    with open_channel(target(token_server), token=token) as channel, pytest.raises(grpc.RpcError) as err:
        call(channel, method)
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert TOKEN not in caplog.text and TOKEN not in err.value.details()


def test_the_right_token_streams_pushes_and_reads_status(token_server):
    got = batches(token_server, token=TOKEN)
    assert [b.step for b in got] == [0, 1] and all(len(b.ids) > 0 for b in got)
    sync = AdapterSync(target(token_server), lora_model("llama", seed=3), every=1, rank=0, token=TOKEN)
    try:
        assert sync.push(step=0) >= 1
    finally:
        sync.close()
    assert int(status(target(token_server), token=TOKEN)["selected_steps"]) >= 2


def test_health_checks_need_no_token(token_server):
    assert serving(target(token_server), token="")
    with pytest.raises(SystemExit) as health:
        status_main(["--health", target(token_server)])
    assert health.value.code == 0


@pytest.mark.parametrize("sent", [TOKEN[:-1], TOKEN + "0", TOKEN.upper(), " " + TOKEN,
                                  TOKEN[:-1] + chr(ord(TOKEN[-1]) ^ 1)],
                         ids=["prefix", "extended", "upper-case", "leading-space", "last-bit"])
def test_only_the_exact_token_passes(token_server, sent):
    with open_channel(target(token_server), token=sent) as channel, pytest.raises(grpc.RpcError) as err:
        call(channel, "Status")
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_tokens_are_compared_whole_in_constant_time(token_server, monkeypatch):
    compared, real = [], hmac.compare_digest
    monkeypatch.setattr(hmac, "compare_digest", lambda a, b: compared.append((a, b)) or real(a, b))
    for sent in (TOKEN, "w"):
        with open_channel(target(token_server), token=sent) as channel:
            try:
                call(channel, "Status")
            except grpc.RpcError:
                pass
    expected = f"Bearer {TOKEN}".encode()
    assert compared == [(expected, expected), (b"Bearer w", expected)]


@pytest.mark.parametrize("streaming", [False, True], ids=["unary", "streaming"])
def test_an_unknown_method_is_refused_like_a_known_one_without_the_token(token_server, streaming):
    codes = []
    for token in ("", TOKEN):
        with open_channel(target(token_server), token=token) as channel:
            method = "/colm.v1.Selector/NotAMethod"
            try:
                if streaming:
                    next(channel.stream_stream(method)(iter([b""]), timeout=10))
                else:
                    channel.unary_unary(method)(b"", timeout=10)
            except grpc.RpcError as err:
                codes.append(err.code())
    assert codes == [grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.UNIMPLEMENTED]


def test_colm_status_reads_the_token_file(token_server, token_file, capsys):
    status_main([target(token_server), "--token-file", token_file])
    assert "steps selected" in capsys.readouterr().out
    with pytest.raises(SystemExit) as refused:
        status_main([target(token_server)])
    assert refused.value.code == 1 and "UNAUTHENTICATED" in capsys.readouterr().err


def test_a_wrong_token_ends_the_coreset_stream_at_once_instead_of_reconnecting(token_server):
    started = time.monotonic()
    with pytest.raises(CoresetStreamError) as err:
        batches(token_server, token="wrong-token")
    assert err.value.code == grpc.StatusCode.UNAUTHENTICATED and TOKEN_FILE_ENV in str(err.value)
    assert time.monotonic() - started < 10  # the reconnect timeout is 300 s


def test_colm_train_sends_the_token_from_its_token_file(token_server, token_file, tmp_path):
    before = token_server.job.param_version
    result = train(parse_args(["--model", "tiny:llama", "--lora-r", "4", "--selector", target(token_server),
                               "--steps", "2", "--output-dir", str(tmp_path / "run"), "--push-every", "1",
                               "--token-file", token_file]))
    assert result["steps"] == 2 and token_server.job.param_version == before + 2


@pytest.mark.parametrize("mode,warned", [(0o644, True), (0o640, True), (0o600, False), (0o400, False)])
def test_a_token_file_open_to_group_or_others_is_used_with_a_warning(tmp_path, caplog, mode, warned):
    path = tmp_path / "token"
    path.write_text(TOKEN + "\n")
    path.chmod(mode)
    caplog.set_level(logging.WARNING, logger="colm_server.service.auth")
    srv = start_selector(tmp_path, auth_token_file=str(path))
    try:
        assert status(target(srv), token=TOKEN)["job_id"] == "default"  # accepted all the same
    finally:
        srv.stop(grace=1)
    warnings = [r.getMessage() for r in caplog.records if r.name == "colm_server.service.auth"]
    if warned:
        assert warnings == [f"service.auth_token_file: {path} has mode {mode:04o}, open to group or others "
                            f"on this machine; the token is a secret: chmod 600 {path}"]
    else:
        assert warnings == []
    assert TOKEN not in caplog.text


# --- TLS ---------------------------------------------------------------------------------------------

def test_a_client_trusting_the_ca_streams_over_tls(tls_server, pki):
    assert [b.step for b in batches(tls_server, tls_ca=pki.ca)] == [0, 1]
    assert int(status(target(tls_server), tls_ca=pki.ca)["selected_steps"]) >= 2


@pytest.mark.parametrize("client", ["plaintext", "other-ca"])
def test_a_tls_selector_is_unreachable_without_tls_or_with_another_ca(tls_server, pki, client):
    tls_ca = "" if client == "plaintext" else pki.other_ca
    with open_channel(target(tls_server), tls_ca=tls_ca) as channel, pytest.raises(grpc.RpcError) as err:
        call(channel, "Status")  # fails fast: no wait_for_ready
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE


def test_tls_and_token_together(tls_token_server, pki, capsys):
    with open_channel(target(tls_token_server), tls_ca=pki.ca) as channel, \
            pytest.raises(grpc.RpcError) as err:
        call(channel, "Status")
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert [b.step for b in batches(tls_token_server, token=TOKEN, tls_ca=pki.ca)] == [0, 1]
    for args, code in ((["--tls-ca", pki.ca], 0), ([], 1)):  # health: TLS needed, the token not
        with pytest.raises(SystemExit) as health:
            status_main(["--health", *args, target(tls_token_server)])
        assert health.value.code == code


def test_trainers_take_the_token_and_ca_from_the_environment(tls_token_server, pki, token_file,
                                                               monkeypatch):
    monkeypatch.setenv(TOKEN_FILE_ENV, token_file)  # as torchrun passes them on to every rank
    monkeypatch.setenv(TLS_CA_ENV, pki.ca)
    assert [b.step for b in batches(tls_token_server)] == [0, 1]
    assert status(target(tls_token_server))["job_id"] == "default"


# --- configuration errors ------------------------------------------------------------------------------

@pytest.mark.parametrize("given,missing", [("tls_cert", "tls_key"), ("tls_key", "tls_cert")])
def test_tls_needs_both_certificate_and_key(given, missing):
    with pytest.raises(ValueError, match=rf"^service\.{missing}: required when service\.{given} is set"):
        load_config(None, [f"service.{given}=/etc/colm/selector.pem"])


@pytest.mark.parametrize("problem,key", [("missing token", "auth_token_file"),
                                         ("empty token", "auth_token_file"),
                                         ("missing certificate", "tls_cert")])
def test_unreadable_secrets_are_refused_when_serving_starts(tmp_path, pki, problem, key):
    empty = tmp_path / "empty-token"
    empty.write_text("\n")
    service = {"missing token": {"auth_token_file": str(tmp_path / "no-such-token")},
               "empty token": {"auth_token_file": str(empty)},
               "missing certificate": {"tls_cert": str(tmp_path / "none.pem"), "tls_key": pki.key}}[problem]
    config = make_config(tmp_path, **{f"service.{k}": v for k, v in service.items()})  # loads anywhere
    with pytest.raises(ValueError, match=rf"^service\.{key}: "):
        SelectorServer(config)
