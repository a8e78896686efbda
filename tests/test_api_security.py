"""SSRF checks, safe fetching, signed webhooks and rate limits, against real local HTTP servers."""

import asyncio
import contextlib
import functools
import io
import logging
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from PIL import Image
from standardwebhooks import Webhook

from imagegenx.api import ssrf
from imagegenx.api.ratelimit import Limiter, RateLimiter, retry_after_header
from imagegenx.api.ssrf import UnsafeURL, afetch, check_url, fetch
from imagegenx.api.webhooks import WebhookSender, new_secret, sign
from imagegenx.types import UserError

# -- a tiny real HTTP server ------------------------------------------------------------------------


class _Server:
    """``http.server`` on 127.0.0.1 in a thread; ``routes`` maps a path to a handler function."""

    def __init__(self, routes):
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _handle(self):
                body = self.rfile.read(int(self.headers.get("content-length") or 0))
                headers = {k.lower(): v for k, v in self.headers.items()}
                server.requests.append((self.command, self.path, headers, body))
                route = routes.get(self.path.split("?")[0])
                if route is None:
                    self.send_error(404)
                    return
                # The client may stop reading (the size cap): that is what some tests want.
                with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                    route(self)

            do_GET = do_POST = _handle

        self.requests = []
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self.base = f"http://127.0.0.1:{self.port}"
        self.allow = {f"127.0.0.1:{self.port}"}
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def _reply(handler, status=200, body=b"", headers=()):
    handler.send_response(status)
    for name, value in headers:
        handler.send_header(name, value)
    handler.send_header("Content-Length", str(len(body)))
    handler.end_headers()
    handler.wfile.write(body)


@pytest.fixture(scope="module")
def png_bytes():
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 30, 30)).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def other_server():
    """A second local server: a redirect there must be refused unless it is explicitly allowed."""
    srv = _Server({"/secret": lambda h: _reply(h, 200, b"internal data")})
    yield srv
    srv.close()


@pytest.fixture(scope="module")
def files(png_bytes, other_server):
    def stream_forever(h):  # no Content-Length: only the client's cap stops it
        h.send_response(200)
        h.end_headers()
        for _ in range(4096):
            h.wfile.write(b"x" * 65536)

    def trickle(h):  # headers, a little data, then nothing
        h.send_response(200)
        h.end_headers()
        h.wfile.write(b"z" * 10)
        h.wfile.flush()
        time.sleep(2)

    routes = {
        "/slow": trickle,
        "/image.png": lambda h: _reply(h, 200, png_bytes, [("Content-Type", "image/png")]),
        "/declared-big": lambda h: _reply(h, 200, b"y" * 300_000),
        "/stream-big": stream_forever,
        "/to-image": lambda h: _reply(h, 302, headers=[("Location", "/image.png")]),
        "/to-other": lambda h: _reply(h, 302, headers=[("Location", f"{other_server.base}/secret")]),
        "/to-metadata": lambda h: _reply(h, 307, headers=[("Location", "http://169.254.169.254/latest/")]),
        "/to-file": lambda h: _reply(h, 302, headers=[("Location", "file:///etc/passwd")]),
        "/loop": lambda h: _reply(h, 302, headers=[("Location", "/loop")]),
    }
    srv = _Server(routes)
    yield srv
    srv.close()


# -- check_url ---------------------------------------------------------------------------------------

BAD_URLS = [
    "http://127.0.0.1/",
    "http://127.0.0.1:8080/x",
    "http://[::1]/",
    "http://169.254.169.254/latest/meta-data/",
    "http://10.0.0.1/",
    "http://10.255.1.2:9000/",
    "http://172.16.5.4/",
    "http://192.168.1.1/",
    "http://100.64.0.1/",  # CGNAT
    "http://0.0.0.0/",
    "http://224.0.0.1/",
    "http://255.255.255.255/",
    "http://2130706433/",  # decimal 127.0.0.1
    "http://0177.0.0.1/",  # octal
    "http://0x7f.1/",  # hex + short
    "http://127.1/",  # short
    "http://0x7f000001/",
    "http://017700000001/",
    "http://0251.0376.0251.0376/",  # octal 169.254.169.254
    "http://3232235777/",  # decimal 192.168.1.1
    "http://localhost/",
    "http://LOCALHOST./",
    "http://api.localhost:3000/",
    "http://[::ffff:127.0.0.1]/",  # IPv4-mapped
    "http://[::ffff:a9fe:a9fe]/",  # IPv4-mapped metadata address
    "http://[fe80::1]/",
    "http://[fd00::1]/",
    "http://[ff02::1]/",
    "http://[::]/",
    "http://[2002:7f00:1::]/",  # 6to4 wrapping 127.0.0.1
    "http://１２７.０.０.１/",  # full-width digits
    "file:///etc/passwd",
    "ftp://example.com/image.png",
    "gopher://example.com/",
    "javascript:alert(1)",
    "/relative/path.png",
    "http://user:pass@example.com/",
    "http://user@example.com/",
    "http://example.com@127.0.0.1/",
    "http://example.com\\@127.0.0.1/",
    "http://1.2.3.4.5/",
    "http://1.2.3.08/",
    "http://256.1.1.1/",
    "http://exa mple.com/",
    "http://%31%32%37.0.0.1/",
    "http:///nohost",
    "http://example.com:99999/",
]


@pytest.mark.parametrize("url", BAD_URLS)
def test_unsafe_urls_are_refused(url):
    with pytest.raises(UnsafeURL):
        check_url(url)


def test_unsafe_url_is_a_user_error_with_a_reason():
    with pytest.raises(UserError, match="link-local"):
        check_url("http://169.254.169.254/")
    with pytest.raises(UserError, match="loopback"):
        check_url("http://2130706433/")
    with pytest.raises(UserError, match="credentials"):
        check_url("https://user:pass@example.com/")
    with pytest.raises(UserError, match="'ftp'"):
        check_url("ftp://example.com/")


def test_numeric_forms_read_like_inet_aton():
    for host in ["2130706433", "0177.0.0.1", "0x7f.1", "127.1", "0x7f000001", "10.1", "0xa.0.258"]:
        assert ssrf._parse_ipv4_loose(host).packed == socket.inet_aton(host), host
    assert ssrf._parse_ipv4_loose("example.com") is None


def test_names_resolving_to_private_addresses_are_refused(monkeypatch):
    answers = {"evil.example": ["93.184.216.34", "10.0.0.7"], "good.example": ["93.184.216.34"]}

    def fake_getaddrinfo(host, port, *args, **kwargs):
        if host not in answers:
            raise socket.gaierror("not found")
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (ip, port)) for ip in answers[host]]

    monkeypatch.setattr(socket, "getaddrinfo", fake_getaddrinfo)
    with pytest.raises(UnsafeURL, match="resolves"):
        check_url("https://evil.example/a.png")  # one bad address among good ones is enough
    with pytest.raises(UserError, match="could not resolve"):
        check_url("https://missing.example/")

    target = check_url("https://Good.Example./path/a.png?sig=1#frag")
    assert target.address == "93.184.216.34"
    assert target.url == "https://good.example/path/a.png?sig=1"
    assert target.request_url == "https://93.184.216.34:443/path/a.png?sig=1"
    assert target.headers == {"Host": "good.example"}
    assert target.extensions == {"sni_hostname": "good.example"}  # TLS still checks the name


def test_public_literals_pass_and_allow_hooks_are_narrow():
    assert check_url("http://8.8.8.8/x").address == "8.8.8.8"
    assert (
        check_url("http://[2606:4700:4700::1111]:8080/").request_url == "http://[2606:4700:4700::1111]:8080/"
    )
    assert check_url("http://[::ffff:8.8.8.8]/").address == "::ffff:808:808"
    assert check_url("http://127.0.0.1:8080/", allow_private=True).address == "127.0.0.1"
    assert check_url("http://127.0.0.1:8080/", allow_hosts={"127.0.0.1:8080"}).port == 8080
    with pytest.raises(UnsafeURL):
        check_url("http://127.0.0.1:8081/", allow_hosts={"127.0.0.1:8080"})
    with pytest.raises(UnsafeURL):  # the hooks never lift the scheme and credential rules
        check_url("file:///etc/passwd", allow_private=True)
    with pytest.raises(UnsafeURL):
        check_url("http://u:p@127.0.0.1/", allow_private=True)


# -- fetch -------------------------------------------------------------------------------------------


def test_fetch_an_image_from_a_local_server(files, png_bytes):
    data = fetch(f"{files.base}/image.png", max_bytes=1 << 20, allow_private=True)
    assert data == png_bytes
    assert Image.open(io.BytesIO(data)).size == (8, 8)
    assert files.requests[-1][2]["host"] == f"127.0.0.1:{files.port}"


def test_fetch_refuses_a_private_server_by_default(files):
    with pytest.raises(UnsafeURL):
        fetch(f"{files.base}/image.png", max_bytes=1 << 20)


def test_fetch_stops_at_max_bytes(files):
    with pytest.raises(UserError, match="larger than 100000 bytes"):
        fetch(f"{files.base}/declared-big", max_bytes=100_000, allow_private=True)
    with pytest.raises(UserError, match="larger than 200000 bytes"):
        fetch(f"{files.base}/stream-big", max_bytes=200_000, allow_private=True)


def test_fetch_reports_the_status(files):
    with pytest.raises(UserError, match="HTTP 404"):
        fetch(f"{files.base}/missing.png", max_bytes=1000, allow_private=True)


def test_fetch_follows_redirects_it_may(files, png_bytes):
    assert fetch(f"{files.base}/to-image", max_bytes=1 << 20, allow_hosts=files.allow) == png_bytes


def test_redirect_to_a_private_address_is_refused(files, other_server):
    # The first hop is allowed (only this server's host:port); the redirect goes elsewhere on 127.0.0.1.
    before = len(other_server.requests)
    with pytest.raises(UnsafeURL, match="loopback"):
        fetch(f"{files.base}/to-other", max_bytes=1 << 20, allow_hosts=files.allow)
    assert len(other_server.requests) == before  # never contacted
    with pytest.raises(UnsafeURL, match="link-local"):
        fetch(f"{files.base}/to-metadata", max_bytes=1 << 20, allow_hosts=files.allow)
    with pytest.raises(UnsafeURL, match="'file'"):
        fetch(f"{files.base}/to-file", max_bytes=1 << 20, allow_hosts=files.allow)
    # With both hosts allowed the same chain works, so the refusal above came from the check.
    allow = files.allow | other_server.allow
    assert fetch(f"{files.base}/to-other", max_bytes=1000, allow_hosts=allow) == b"internal data"


def test_redirect_loops_stop(files):
    with pytest.raises(UserError, match="more than 3 redirects"):
        fetch(f"{files.base}/loop", max_bytes=1000, allow_private=True)


def test_a_stalled_server_times_out(files):
    start = time.monotonic()
    with pytest.raises(UserError, match="timed out"):
        fetch(f"{files.base}/slow", max_bytes=1000, allow_private=True, timeout_s=0.3)
    assert time.monotonic() - start < 1.5


def test_network_errors_are_user_errors():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # nothing listens once it is closed
    with pytest.raises(UserError, match="ConnectError"):
        fetch(f"http://127.0.0.1:{port}/", max_bytes=1000, allow_private=True, timeout_s=2)


def _self_signed(tmp_path, name):
    """A certificate for ``name`` (and its key) as PEM files, plus a client context trusting it."""
    import datetime as dt
    import ssl

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(hours=1))
        .not_valid_after(now + dt.timedelta(hours=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_pem = cert.public_bytes(serialization.Encoding.PEM)
    (tmp_path / "cert.pem").write_bytes(cert_pem)
    (tmp_path / "key.pem").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    client = ssl.create_default_context(cadata=cert_pem.decode())
    return tmp_path / "cert.pem", tmp_path / "key.pem", client


@pytest.mark.parametrize("cert_name", ["images.example", "someone-else.example"])
def test_https_connects_to_the_checked_address_and_verifies_the_name(
    tmp_path, monkeypatch, png_bytes, cert_name
):
    """DNS is answered once (the check); TLS still verifies the URL's name, sent as SNI."""
    import ssl

    cert, key, client_context = _self_signed(tmp_path, cert_name)
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_context.load_cert_chain(cert, key)
    seen_sni = []
    server_context.sni_callback = lambda sock, name, ctx: seen_sni.append(name)
    srv = _Server({"/image.png": lambda h: _reply(h, 200, png_bytes)})
    srv.httpd.socket = server_context.wrap_socket(srv.httpd.socket, server_side=True)

    real_getaddrinfo = socket.getaddrinfo
    lookups = []

    def fake_getaddrinfo(host, port, *args, **kwargs):
        lookups.append(host)
        if host == "images.example":
            return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.1", port))]
        return real_getaddrinfo(host, port, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", fake_getaddrinfo)
    monkeypatch.setattr(ssrf, "_ssl_context", lambda: client_context)
    url = f"https://images.example:{srv.port}/image.png"
    try:
        if cert_name == "images.example":
            assert fetch(url, max_bytes=1 << 20, allow_hosts={f"images.example:{srv.port}"}) == png_bytes
            assert srv.requests[-1][2]["host"] == f"images.example:{srv.port}"
            assert seen_sni == ["images.example"]
        else:  # a certificate for another name is refused even though the address was allowed
            with pytest.raises(UserError, match="ConnectError"):
                fetch(url, max_bytes=1 << 20, allow_hosts={f"images.example:{srv.port}"})
        # The name was resolved once, by the check; httpx only connected to the address it was given.
        assert [host for host in lookups if host != "127.0.0.1"] == ["images.example"]
    finally:
        srv.close()


def test_afetch_shares_the_rules(files, png_bytes):
    async def scenario():
        image = await afetch(f"{files.base}/to-image", max_bytes=1 << 20, allow_hosts=files.allow)
        with pytest.raises(UnsafeURL):
            await afetch(f"{files.base}/to-other", max_bytes=1 << 20, allow_hosts=files.allow)
        with pytest.raises(UserError, match="larger than"):
            await afetch(f"{files.base}/stream-big", max_bytes=50_000, allow_private=True)
        with pytest.raises(UserError, match="HTTP 404"):
            await afetch(f"{files.base}/nope", max_bytes=1000, allow_private=True)
        with pytest.raises(UnsafeURL):
            await afetch("http://0177.0.0.1/", max_bytes=1000)
        return image

    assert asyncio.run(scenario()) == png_bytes


# -- webhooks ----------------------------------------------------------------------------------------


class _Receiver:
    """Answers webhook POSTs with the next status from ``script`` (then 200)."""

    def __init__(self, script=(), headers=()):
        self.script = list(script)
        self.headers = list(headers)
        self.lock = threading.Lock()
        self.server = _Server({"/hook": self._hook})
        self.url = f"{self.server.base}/hook"
        self.check = functools.partial(check_url, allow_hosts=self.server.allow)

    def _hook(self, handler):
        with self.lock:
            status = self.script.pop(0) if self.script else 200
        _reply(handler, status, b"ok", self.headers if status != 200 else ())

    @property
    def requests(self):
        return self.server.requests

    def close(self):
        self.server.close()


@pytest.fixture
def receiver():
    made = []

    def make(script=(), headers=()):
        made.append(_Receiver(script, headers))
        return made[-1]

    yield make
    for r in made:
        r.close()


def test_sign_matches_the_reference_library():
    secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
    body = b'{"type":"task.succeeded","data":{"task_id":"t1"}}'
    signature = sign(secret, "msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330, body)
    from datetime import UTC, datetime

    expected = Webhook(secret).sign(
        "msg_p5jXN8AQM9LWM0D4loKWxJek", datetime.fromtimestamp(1614265330, UTC), body.decode()
    )
    assert signature == expected
    assert signature == "v1," + signature.split(",", 1)[1] and len(signature) == 47


def test_new_secret_is_usable():
    secret = new_secret()
    assert secret.startswith("whsec_") and secret != new_secret()
    Webhook(secret)  # the reference library accepts it
    with pytest.raises(UserError):
        WebhookSender("whsec_c2hvcnQ=")  # 5 bytes: below the spec's 24
    with pytest.raises(UserError):
        WebhookSender("whsec_not base64!")


def test_delivery_is_signed_and_verifiable(receiver):
    hook = receiver()
    secret = new_secret()
    with WebhookSender(secret, check=hook.check) as sender:
        sender.send(hook.url, "task.succeeded", {"task_id": "t1", "results": {"original": "k/1.png"}})
        assert sender.flush(10)
    assert sender.stats["delivered"] == 1
    method, path, headers, body = hook.requests[0]
    assert (method, path, headers["content-type"]) == ("POST", "/hook", "application/json")
    payload = Webhook(secret).verify(body, headers)
    assert payload["type"] == "task.succeeded"
    assert payload["data"] == {"task_id": "t1", "results": {"original": "k/1.png"}}
    assert payload["timestamp"].endswith("Z")
    assert headers["webhook-id"].startswith("msg_")
    with pytest.raises(Exception, match="signature"):
        Webhook(new_secret()).verify(body, headers)


def test_retries_after_two_500s_then_succeeds(receiver):
    hook = receiver([500, 500])
    secret = new_secret()
    sender = WebhookSender(secret, retries=5, base_delay_s=0.02, check=hook.check)
    sender.send(hook.url, "task.failed", {"task_id": "t2"})
    assert sender.flush(10)
    sender.close()
    assert len(hook.requests) == 3
    assert sender.stats == {"delivered": 1, "failed": 0, "dropped": 0, "attempts": 3}
    ids = {headers["webhook-id"] for _, _, headers, _ in hook.requests}
    assert len(ids) == 1  # the same id on every attempt: receivers deduplicate on it
    for _, _, headers, body in hook.requests:
        Webhook(secret).verify(body, headers)


def test_429_with_retry_after_is_retried(receiver):
    hook = receiver([429], headers=[("Retry-After", "0")])
    with WebhookSender(new_secret(), base_delay_s=30, check=hook.check) as sender:
        sender.send(hook.url, "task.succeeded", {})
        assert sender.flush(10)  # Retry-After: 0 beats the 30 s backoff
    assert sender.stats["delivered"] == 1 and len(hook.requests) == 2


def test_gives_up_after_the_retries(receiver, caplog):
    hook = receiver([503] * 10)
    with (
        caplog.at_level(logging.WARNING, logger="imagegenx.api.webhooks"),
        WebhookSender(new_secret(), retries=2, base_delay_s=0.01, check=hook.check) as sender,
    ):
        sender.send(hook.url, "task.succeeded", {"task_id": "t3"})
        assert sender.flush(10)
    assert len(hook.requests) == 3  # the first attempt and 2 retries
    assert sender.stats["failed"] == 1 and sender.stats["delivered"] == 0
    assert any("gave up after 3 attempt(s): HTTP 503" in r.getMessage() for r in caplog.records)


def test_client_errors_are_not_retried(receiver):
    hook = receiver([400])
    with WebhookSender(new_secret(), base_delay_s=0.01, check=hook.check) as sender:
        sender.send(hook.url, "task.succeeded", {})
        assert sender.flush(10)
    assert len(hook.requests) == 1 and sender.stats["failed"] == 1


def test_webhook_urls_are_ssrf_checked(receiver):
    hook = receiver()
    with WebhookSender(new_secret(), base_delay_s=0.01) as sender:  # the default check
        sender.send(hook.url, "task.succeeded", {})
        sender.send("http://169.254.169.254/latest/", "task.succeeded", {})
        assert sender.flush(10)
    assert hook.requests == [] and sender.stats["failed"] == 2


def test_the_queue_is_bounded():
    entered, release = threading.Event(), threading.Event()

    def blocking_check(url):
        entered.set()
        release.wait(10)
        raise UnsafeURL("refused")

    sender = WebhookSender(new_secret(), check=blocking_check, max_pending=3, workers=1)
    sender.send("http://example.invalid/", "e", {})
    assert entered.wait(5)  # the worker holds the first delivery
    for _ in range(9):
        sender.send("http://example.invalid/", "e", {})
    assert sender.stats["dropped"] == 6
    release.set()
    sender.close(timeout=10)
    assert sender.stats["failed"] == 4
    sender.send("http://example.invalid/", "e", {})  # after close: dropped, never raises
    assert sender.stats["dropped"] == 7


# -- rate limits -------------------------------------------------------------------------------------


def test_burst_then_refusal_with_retry_after():
    limiter = RateLimiter()
    assert isinstance(limiter, Limiter)
    assert all(limiter.hit("key", 5, now=100.0) is None for _ in range(5))
    wait = limiter.hit("key", 5, now=100.0)
    assert wait == pytest.approx(0.2)
    assert retry_after_header(wait) == "1"


def test_tokens_refill_over_time():
    limiter = RateLimiter()
    for _ in range(10):
        limiter.hit("k", 10, now=0.0)
    assert limiter.hit("k", 10, now=0.0) is not None
    assert limiter.hit("k", 10, now=0.05) is not None  # half a token
    assert limiter.hit("k", 10, now=0.1) is None  # one token back
    assert limiter.hit("k", 10, now=0.1) is not None
    assert all(limiter.hit("k", 10, now=100.0) is None for _ in range(10))  # full again, capped at burst
    assert limiter.hit("k", 10, now=100.0) is not None


def test_slow_rates_have_a_burst_of_one():
    limiter = RateLimiter()
    assert limiter.hit("slow", 0.5, now=0.0) is None
    assert limiter.hit("slow", 0.5, now=0.0) == pytest.approx(2.0)
    assert limiter.hit("slow", 0.5, now=1.0) == pytest.approx(1.0)
    assert limiter.hit("slow", 0.5, now=2.0) is None
    with pytest.raises(ValueError):
        limiter.hit("slow", 0, now=0.0)


def test_keys_are_isolated():
    limiter = RateLimiter()
    assert limiter.hit("a", 1, now=0.0) is None
    assert limiter.hit("a", 1, now=0.0) is not None
    assert limiter.hit("b", 1, now=0.0) is None


def test_memory_is_capped():
    limiter = RateLimiter(max_keys=1000)
    for i in range(5000):
        limiter.hit(f"ip-{i}", 1, now=0.0)
    assert len(limiter) == 1000
    assert limiter.hit("ip-4999", 1, now=0.0) is not None  # recent keys are kept
    assert limiter.hit("ip-0", 1, now=0.0) is None  # the oldest were evicted (and start full)


def test_threads_never_get_more_than_the_burst():
    limiter = RateLimiter(clock=lambda: 0.0)
    allowed = []

    def worker():
        allowed.extend(limiter.hit("shared", 50) is None for _ in range(100))

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sum(allowed) == 50
