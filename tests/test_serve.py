"""`nanopali serve`, the real server in a subprocess on a loopback port, spoken to with the official `openai`
client and plain HTTP: its answers are the pipeline's, and every limit and safety case of the API is one row."""

import base64
import concurrent.futures
import http.server
import io
import os
import shutil
import socket
import threading
import time

import httpx
import numpy as np
import pytest
import torch
from openai import OpenAI
from PIL import Image
from serve_process import EXAMPLES, KEY, chat_body, data_url, running_server
from siglip_reference import write_checkpoint as write_siglip_checkpoint

import nanopali

WORLD = [EXAMPLES / f"world-{i}.png" for i in range(6)]
pytestmark = pytest.mark.usefixtures("one_torch_thread")  # the references, in one thread as the servers (--threads 1)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """allowed/ (what --allow-local-images names) with an image and a symlink out of it; outside/ beside it."""
    root = tmp_path_factory.mktemp("images")
    (root / "allowed").mkdir()
    (root / "outside").mkdir()
    (root / "allowed" / "world-1.png").write_bytes(WORLD[1].read_bytes())
    (root / "outside" / "secret.png").write_bytes(WORLD[2].read_bytes())
    (root / "allowed" / "link.png").symlink_to(root / "outside" / "secret.png")
    return root


@pytest.fixture(scope="module")
def siglip_dir(tmp_path_factory):
    """A tiny random SigLIP checkpoint (transformers' weights, a tokenizer trained here) for --siglip."""
    folder = tmp_path_factory.mktemp("siglip")
    write_siglip_checkpoint(folder)
    return folder


@pytest.fixture(scope="module")
def server(folders, siglip_dir):
    with running_server("--api-key", KEY, "--allow-local-images", str(folders / "allowed"), "--dtype", "float32",
                        "--max-body-bytes", "1500000", "--max-image-pixels", "1000000",
                        "--siglip", str(siglip_dir), "--siglip-name", "tiny-siglip") as s:
        yield s


@pytest.fixture(scope="module")
def client(server):
    return OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0)


@pytest.fixture(scope="module")
def pali():
    return nanopali.load(dtype="float32")  # what the servers load: the default model, in float32 (--dtype float32)


@pytest.fixture(scope="module")
def captions(pali):
    return pali.caption([str(image) for image in WORLD])


def ask(client, prompt, image, **options):
    """The openai client's chat completion of one prompt about an image file (greedy unless told otherwise)."""
    body = chat_body(prompt, data_url(image), **options)
    return client.chat.completions.create(**body)


def test_the_openai_client_gets_the_pipelines_answers(client, pali, captions):
    image, caption = str(WORLD[0]), captions[0]
    reply = ask(client, "caption en", WORLD[0])
    assert reply.choices[0].message.content == caption
    assert reply.object == "chat.completion" and reply.model == "nanopali-default" and reply.id.startswith("chatcmpl-")
    assert reply.choices[0].finish_reason == "stop"
    assert reply.usage.prompt_tokens == len(pali.processor.prefix_ids("caption en"))
    assert reply.usage.completion_tokens == len(pali.processor.tokenizer.encode(caption))

    chunks = list(ask(client, "caption en", WORLD[0], stream=True))
    pieces = [c.choices[0].delta.content for c in chunks if c.choices[0].delta.content]
    assert len(pieces) > 3 and "".join(pieces) == caption
    assert chunks[0].choices[0].delta.role == "assistant" and chunks[-1].choices[0].finish_reason == "stop"

    found = pali.detect(image, ["star", "square"])
    reply = ask(client, "detect star ; square", WORLD[0])
    objects = reply.choices[0].message.model_extra["objects"]
    assert reply.choices[0].message.content == found.text
    assert [(o["label"], tuple(o["box"])) for o in objects] == [(d.label, d.box) for d in found] and len(found) == 2
    assert [o["score"] for o in objects] == pytest.approx([d.score for d in found], abs=1e-5)


def test_a_plain_question_is_answered_as_answer_en(client, pali):
    reply = ask(client, "what color is the star?", WORLD[0])
    assert reply.choices[0].message.content == pali.answer(str(WORLD[0]), "what color is the star?")


def test_stop_strings_are_cut_and_max_tokens_is_a_length_finish(client, captions):
    caption = captions[0]
    word = caption.split()[3]
    reply = ask(client, "caption en", WORLD[0], stop=[word])
    assert reply.choices[0].message.content == caption[:caption.index(word)]
    streamed = ask(client, "caption en", WORLD[0], stop=word, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in streamed) == caption[:caption.index(word)]
    reply = ask(client, "caption en", WORLD[0], max_tokens=3)
    assert reply.choices[0].finish_reason == "length" and reply.usage.completion_tokens == 3
    assert caption.startswith(reply.choices[0].message.content)


def test_sampling_with_a_seed_repeats(client):
    def sample():
        return ask(client, "caption en", WORLD[3], temperature=1.5, top_p=0.95, seed=7, max_tokens=20,
                   extra_body={"top_k": 40}).choices[0].message.content
    assert sample() == sample()


def test_the_task_endpoints_give_the_pipelines_objects(server, pali):
    for task, labels in (("detect", ["star", "square"]), ("segment", "triangle")):
        body = {"image": base64.b64encode(WORLD[0].read_bytes()).decode(), "labels": labels}
        reply = server.post(f"/v1/{task}", json=body)
        assert reply.status_code == 200, reply.text
        got, expected = reply.json(), getattr(pali, task)(str(WORLD[0]), labels)
        assert got["text"] == expected.text and got["image_size"] == [128, 128] and len(expected) >= 1
        assert [(o["label"], tuple(o["box"])) for o in got["objects"]] == [(o.label, o.box) for o in expected]
        if task == "segment":
            masks = [np.array(Image.open(io.BytesIO(base64.b64decode(o["mask"])))) for o in got["objects"]]
            assert all(np.array_equal(m, o.mask) for m, o in zip(masks, expected)) and masks[0].any()


def test_concurrent_requests_share_decode_steps_and_get_their_own_answers(server, client, captions):
    images = WORLD + WORLD[:2]
    steps_before, rows_before = server.metric("nanopali_batch_size_count"), server.metric("nanopali_batch_size_sum")

    with concurrent.futures.ThreadPoolExecutor(len(images)) as pool:
        answers = list(pool.map(lambda image: ask(client, "caption en", image).choices[0].message.content, images))
    assert answers == captions + captions[:2]
    steps = server.metric("nanopali_batch_size_count") - steps_before
    rows = server.metric("nanopali_batch_size_sum") - rows_before
    assert rows / steps > 2, f"{rows:g} row-steps in {steps:g} decode steps: the requests were not batched"


def test_a_bad_image_among_good_ones_fails_alone(server, captions):
    bad = base64.b64encode(os.urandom(3000)).decode()
    bodies = [chat_body("caption en", data_url(WORLD[i])) for i in range(3)]
    bodies.insert(1, chat_body("caption en", "data:image/png;base64," + bad))
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        replies = list(pool.map(lambda b: server.post("/v1/chat/completions", json=b), bodies))
    assert replies[1].status_code == 400 and "not an image" in replies[1].json()["error"]["message"]
    good = [r.json()["choices"][0]["message"]["content"] for i, r in enumerate(replies) if i != 1]
    assert good == captions[:3]
    assert server.get("/health").status_code == 200


def test_the_engine_goes_on_after_a_step_fails(pali, captions):
    """A bug in a decode step ends the rows of that batch with the error; the next request is served as usual."""
    from nanopali.serve.engine import Engine
    from nanopali.serve.metrics import Metrics

    engine = Engine(pali, max_batch=4, max_queue=4, metrics=Metrics())
    step, calls = engine.batch.step, []

    def broken_once():
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("a bug in the step")
        return step()
    engine.batch.step = broken_once
    engine.start()
    try:
        rows = []
        for image in WORLD[:2]:
            done = threading.Event()
            rows.append(pali.row(str(image), "caption en"))
            engine.submit(rows[-1], lambda row, done=done: done.set())
            assert done.wait(60)
    finally:
        engine.stop()
    assert rows[0].finish_reason == "error" and "a bug in the step" in str(rows[0].error)
    assert rows[1].finish_reason == "stop" and rows[1].answer.text == captions[1]


def test_health_is_503_while_the_model_loads_and_says_why_a_load_failed(pali):
    """In-process app (Starlette's TestClient runs its startup): the loader waits until released."""
    from starlette.testclient import TestClient

    from nanopali.errors import MissingFileError
    from nanopali.serve.app import Settings, create_app

    release, failures = threading.Event(), []
    with TestClient(create_app(Settings(), lambda: release.wait(60) and pali)) as app:
        assert app.get("/health").status_code == 503 and app.get("/health").json() == {"status": "loading"}
        reply = app.post("/v1/chat/completions", json=chat_body("caption en", data_url(WORLD[0])))
        assert reply.status_code == 503 and "still loading" in reply.json()["error"]["message"]
        release.set()
        deadline = time.monotonic() + 60
        while app.get("/health").status_code != 200 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert app.get("/health").json() == {"status": "ok"}

    def missing():
        raise MissingFileError("no config.json in /nowhere")
    with TestClient(create_app(Settings(), missing, on_load_error=failures.append)) as app:
        deadline = time.monotonic() + 10
        while not failures and time.monotonic() < deadline:
            time.sleep(0.05)
        assert app.get("/health").json() == {"status": "error", "error": "no config.json in /nowhere"}
    assert isinstance(failures[0], MissingFileError)


def _png(width, height) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (200, 30, 30)).save(buffer, format="PNG")
    return buffer.getvalue()


CHAT = "/v1/chat/completions"
LIMITS = [  # (case, method, path, request, status, words the error message must contain)
    ("no API key", "post", CHAT, dict(json=chat_body("caption en", "x"), key=None), 401, "API key"),
    ("a wrong API key", "post", CHAT, dict(json=chat_body("caption en", "x"), key="wrong-key-5b1c"), 401, "API key"),
    ("metrics need the key", "get", "/metrics", dict(key=None), 401, "API key"),
    ("models need the key", "get", "/v1/models", dict(key=None), 401, "API key"),
    ("a body over --max-body-bytes", "post", CHAT, dict(content=b"{" + b" " * 1_600_000 + b"}"), 413, "1500000 bytes"),
    ("an image over --max-image-pixels", "post", CHAT, dict(json=chat_body("caption en", data_url(_png(1100, 1000)))),
     400, "1100x1000 = 1100000 pixels is over the limit of 1000000"),
    ("an undecodable image", "post", CHAT, dict(json=chat_body("caption en", data_url(b"\x89PNG\r\n\x1a\nbroken"))),
     400, "not an image"),
    ("an image that is not base64", "post", CHAT, dict(json=chat_body("caption en", "data:image/png;base64,@@@")), 400,
     "not valid base64"),
    ("bad JSON", "post", CHAT, dict(content=b'{"model": "nanopali-default", "messages": [', headers={
        "Content-Type": "application/json"}), 400, "not valid JSON"),
    ("a field of the wrong type", "post", CHAT, dict(json=chat_body("caption en", "x", temperature="hot")), 422,
     "temperature"),
    ("a missing field", "post", CHAT, dict(json={"model": "nanopali-default"}), 422, "messages"),
    ("an unknown field", "post", CHAT, dict(json=chat_body("caption en", "x", logprobs=True)), 422, "logprobs"),
    ("an out-of-range value", "post", CHAT, dict(json=chat_body("caption en", "x", top_p=1.5)), 422, "top_p"),
    ("an unknown model", "post", CHAT, dict(json={**chat_body("caption en", "x"), "model": "gpt-9"}), 404,
     "'gpt-9' not found"),
    ("a prompt over the model's length", "post", CHAT,
     dict(json=chat_body("answer en " + "why " * 600, data_url(WORLD[0]))), 400, "takes at most 512"),
    ("max_tokens over the model's length", "post", CHAT,
     dict(json=chat_body("caption en", data_url(WORLD[0]), max_tokens=500)), 400, "takes at most 512"),
    ("n other than 1", "post", CHAT, dict(json=chat_body("caption en", data_url(WORLD[0]), n=2)), 400, "n=2"),
    ("two images", "post", CHAT, dict(json={**chat_body("caption en", "x"), "messages": [{"role": "user", "content": [
        {"type": "text", "text": "caption en"}, *[{"type": "image_url", "image_url": {"url": "x"}}] * 2]}]}), 400,
     "exactly one image_url"),
    ("a remote image without --allow-remote-images", "post", CHAT,
     dict(json=chat_body("caption en", "http://127.0.0.1:9/a.png")), 403, "--allow-remote-images"),
    ("a local image outside the allowed folder", "post", CHAT,
     dict(json=chat_body("caption en", "file:///etc/hostname")), 403, "outside the folder"),
    ("labels with nothing in them", "post", "/v1/detect", dict(json={"image": "x", "labels": " ; "}), 400, "labels"),
    ("classify without labels", "post", "/v1/classify", dict(json={"image": data_url(WORLD[0]), "labels": " , "}), 400,
     "no labels"),
    ("classify: an unknown model", "post", "/v1/classify", dict(json={"model": "gpt-9", "image": data_url(WORLD[0]),
                                                                       "labels": "a"}), 404, "'gpt-9' not found"),
    ("classify: a template without {}", "post", "/v1/classify",
     dict(json={"image": data_url(WORLD[0]), "labels": "a", "template": "a photo"}), 400, "one {}"),
    ("embeddings: another width", "post", "/v1/embeddings", dict(json={"input": "a", "dimensions": 7}), 400,
     "dimensions=7"),
    ("embeddings: no input", "post", "/v1/embeddings", dict(json={"input": []}), 422, "input"),
    ("embeddings: too many inputs", "post", "/v1/embeddings", dict(json={"input": ["a"] * 257}), 422, "input"),
    ("embeddings: an undecodable image", "post", "/v1/embeddings", dict(json={"input": [
        {"type": "image_url", "image_url": {"url": data_url(b"broken")}}]}), 400, "not an image"),
]


@pytest.mark.parametrize("case, method, path, sent, status, words", LIMITS, ids=[row[0] for row in LIMITS])
def test_limits_and_bad_requests(server, case, method, path, sent, status, words):
    reply = getattr(server, method)(path, **sent)
    assert reply.status_code == status, reply.text
    error = reply.json()["error"]
    assert words in error["message"] and error["type"], error
    if status == 401:
        assert reply.headers["WWW-Authenticate"] == "Bearer"


def test_health_and_the_page_need_no_key_and_every_refusal_is_counted(server):
    assert httpx.get(server.url + "/health").json() == {"status": "ok"}
    page = httpx.get(server.url + "/")
    assert page.status_code == 200 and "<canvas" in page.text
    assert "http:" not in page.text and "https:" not in page.text and "//cdn" not in page.text  # nothing from elsewhere
    text = server.get("/metrics").text
    for line in ('nanopali_rejected_total{reason="unauthorized"}', 'nanopali_rejected_total{reason="too_large"}',
                 'nanopali_requests_total{endpoint="/v1/chat/completions",status="400"}'):
        assert line in text, line


def test_local_images_stay_inside_the_allowed_folder(server, folders, captions):
    allowed = folders / "allowed"
    reply = server.post(CHAT, json=chat_body("caption en", (allowed / "world-1.png").as_uri()))
    assert reply.status_code == 200 and reply.json()["choices"][0]["message"]["content"] == captions[1]
    for url in [f"file://{allowed}/../outside/secret.png", (allowed / "link.png").as_uri()]:
        reply = server.post(CHAT, json=chat_body("caption en", url))
        assert reply.status_code == 403 and "outside the folder" in reply.json()["error"]["message"], url


def test_a_storm_of_mixed_requests_is_answered_in_full(server, captions):
    """The test-suite's version of the soak (benchmarks/soak_serve.py runs 60 s): 32 clients for a few seconds
    with good, malformed and oversized requests; every one is answered, and the server is fine after."""
    bodies = [dict(json=chat_body("caption en", data_url(WORLD[0]), max_tokens=4)),
              dict(content=b"{not json", headers={"Content-Type": "application/json"}), dict(content=b"x" * 1_600_000),
              dict(json=chat_body("caption en", data_url(b"garbage")))]
    expected = (200, 400, 413, 400)
    answered, wrong, stop = [], [], time.monotonic() + 4

    def client(i):
        while time.monotonic() < stop:
            kind = (i + len(answered)) % 4
            status = server.post(CHAT, **bodies[kind]).status_code
            (answered if status in (expected[kind], 503) else wrong).append((kind, status))
    threads = [threading.Thread(target=client, args=(i,)) for i in range(32)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not wrong and len(answered) > 32, (wrong, len(answered))
    reply = server.post(CHAT, json=chat_body("caption en", data_url(WORLD[5])))
    assert reply.json()["choices"][0]["message"]["content"] == captions[5]


# ---------------------------------------------------------------------- a server with one row and one queue place


@pytest.fixture(scope="module")
def small_server():
    with running_server("--max-batch", "1", "--max-queue", "1", "--allow-remote-images", "--dtype", "float32") as s:
        yield s


LONG = dict(min_tokens=440, max_tokens=440)  # the default model takes 512 positions: 68 for the prompt


def test_a_full_queue_is_a_503_and_a_disconnect_cancels(small_server, captions):
    client = OpenAI(base_url=small_server.url + "/v1", api_key="unused", max_retries=0)
    long = ask(client, "caption en", WORLD[0], stream=True, extra_body=LONG)
    next(iter(long))  # decoding now, in the only batch row
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        waiting = pool.submit(small_server.post, CHAT, json=chat_body("caption en", data_url(WORLD[1])))
        deadline = time.monotonic() + 30
        while small_server.metric("nanopali_queue_length") < 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        refused = small_server.post(CHAT, json=chat_body("caption en", data_url(WORLD[2])))
        assert refused.status_code == 503 and refused.headers["Retry-After"] == "1", refused.text
        assert "busy" in refused.json()["error"]["message"]
        long.close()  # the client goes away: its row is cancelled at the next step, and the waiting one runs
        assert waiting.result(timeout=60).json()["choices"][0]["message"]["content"] == captions[1]
    assert small_server.metric('nanopali_rows_ended_total{reason="cancelled"}') == 1
    assert small_server.metric("nanopali_generated_tokens_total") < 440, "the cancelled row went on decoding"


def test_remote_images_when_allowed(small_server, captions):
    """--allow-remote-images fetches http(s) URLs (here from a loopback server; nothing leaves the machine)."""
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            data = WORLD[4].read_bytes()
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args):
            pass
    files = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=files.serve_forever, daemon=True).start()
    try:
        reply = small_server.post(CHAT, json=chat_body("caption en", f"http://127.0.0.1:{files.server_port}/w.png"))
    finally:
        files.shutdown()
    assert reply.json()["choices"][0]["message"]["content"] == captions[4]


def test_a_request_past_the_timeout_is_a_504_and_the_key_may_come_from_the_environment():
    with running_server("--timeout", "0.3", env={"NANOPALI_API_KEY": "from-env-5b1c"}) as s:
        assert s.get("/v1/models", key=None).status_code == 401
        reply = s.post(CHAT, json=chat_body("caption en", data_url(WORLD[0]), **LONG), key="from-env-5b1c")
        assert reply.status_code == 504 and "timeout of 0.3 s" in reply.json()["error"]["message"]
        assert s.metric('nanopali_rows_ended_total{reason="timeout"}', key="from-env-5b1c") == 1
        assert s.get("/health", key=None).status_code == 200


# ---------------------------------------------------------------------- the command line


@pytest.mark.parametrize("args, message", [
    (["--port", "70000"], "--port 70000"),
    (["--max-batch", "0"], "--max-batch 0"),
    (["--allow-local-images", "/no/such/folder"], "not a directory"),
    (["--model", "/no/such/model"], "/no/such/model"),
    (["--device", "cuda:99"], "cuda"),
    (["--siglip", "/no/such/siglip"], "/no/such/siglip"),
])
def test_serve_flags_are_checked_before_it_listens(capsys, args, message):
    from nanopali import cli

    assert cli.main(["serve", *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("nanopali: error:") and message in err and len(err.strip().splitlines()) == 1


def test_a_taken_port_is_one_clear_error(capsys):
    from nanopali import cli

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        assert cli.main(["serve", "--port", str(taken.getsockname()[1])]) == 2
    assert "cannot listen on 127.0.0.1" in capsys.readouterr().err


# ---------------------------------------------------------------------- the web page, in a real headless browser

CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")
SCREENSHOTS = os.environ.get("NANOPALI_SCREENSHOTS")  # a folder to keep the screenshots in (docs/ has the last ones)


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    if not (CHROMIUM and CHROMEDRIVER):
        pytest.skip("needs Debian's chromium and chromium-driver (apt-get install chromium chromium-driver; .ci/run "
                    "installs them): no browser could be found here")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 f"--user-data-dir={tmp_path_factory.mktemp('chromium')}", "--window-size=1100,740"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    yield driver
    driver.quit()


def test_the_web_page_captions_and_detects_in_a_real_browser(server, browser, captions, pali, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    def element(id_):
        return browser.find_element(By.ID, id_)

    def run(task, text=""):
        Select(element("task")).select_by_value(task)
        if text:
            element("text").clear()
            element("text").send_keys(text)
        element("run").click()
        WebDriverWait(browser, 60).until(lambda b: element("run").is_enabled() and b.find_element(
            By.TAG_NAME, "body").get_attribute("data-state") != "running")

    def screenshot(name):
        path = os.path.join(SCREENSHOTS or tmp_path, name)
        browser.save_screenshot(path)
        assert Image.open(path).size[0] > 500

    browser.get(server.url + "/")
    browser.find_element(By.TAG_NAME, "summary").click()
    element("key").send_keys(KEY + "\t")  # the page asks /v1/models with it
    element("file").send_keys(str(WORLD[0]))
    WebDriverWait(browser, 30).until(lambda b: element("run").is_enabled())
    assert element("model").text == "nanopali-default"

    run("caption")
    assert element("answer").text == captions[0] and not element("error").text
    screenshot("serve-caption.png")

    run("detect", "star ; square")
    expected = pali.detect(str(WORLD[0]), ["star", "square"])
    drawn = browser.execute_script("return window.nanopaliDrawn")
    scale = browser.execute_script("return document.getElementById('canvas').width") / 128
    assert [(d["label"], d["box"]) for d in drawn] == [(o.label, [round(v * scale) for v in o.box]) for o in expected]
    for d in drawn:  # each box is on the canvas, in its colour: the middle of its left edge
        x0, y0, x1, y1 = d["box"]
        pixel = browser.execute_script("return Array.from(document.getElementById('canvas').getContext('2d')"
                                       ".getImageData(arguments[0], arguments[1], 1, 1).data)", x0, (y0 + y1) // 2)
        assert pixel[:3] == [int(d["color"][k:k + 2], 16) for k in (1, 3, 5)], (d, pixel)
    listed = element("objects").text
    assert all(o.label in listed and f"{o.score:.3f}" in listed for o in expected) and len(expected) == 2
    assert element("answer").text == expected.text
    screenshot("serve-detect.png")

    run("prompt", "answer en " + "why " * 600)  # the server refuses it: the page says why
    assert "takes at most 512" in element("error").text


# ---------------------------------------------------------------------- the contrastive model: embeddings, classify


@pytest.fixture(scope="module")
def clip(siglip_dir):
    return nanopali.load_contrastive(siglip_dir)  # what the server loads (--siglip DIR, float32)


def test_embeddings_equal_the_pipelines_through_the_openai_client(server, client, clip):
    texts = ["a red circle", "two shapes", "word " * 40]
    want = clip.embed_texts(texts)
    for options in ({}, {"encoding_format": "float"}):  # without one, the client asks for base64 and decodes it
        reply = client.embeddings.create(model="tiny-siglip", input=texts, **options)
        torch.testing.assert_close(torch.tensor([d.embedding for d in reply.data]), want, rtol=1e-4, atol=1e-5)
    reply = client.embeddings.create(model="tiny-siglip", input=texts, encoding_format="base64")
    got = np.stack([np.frombuffer(base64.b64decode(d.embedding), "<f4") for d in reply.data])
    torch.testing.assert_close(torch.from_numpy(got.copy()), want, rtol=1e-4, atol=1e-5)
    assert reply.model == "tiny-siglip" and reply.usage.prompt_tokens > 0
    raw = server.post("/v1/embeddings", json={"input": texts}).json()
    assert raw["truncated"] == [2]  # the 41-token text was cut to the text tower's 16


def test_embeddings_of_image_parts_and_classify_equal_the_pipelines(server, clip):
    reply = server.post("/v1/embeddings", json={"model": "tiny-siglip", "input": [
        "a red circle", {"type": "image_url", "image_url": {"url": data_url(WORLD[1])}}]})
    assert reply.status_code == 200, reply.text
    got = torch.tensor([d["embedding"] for d in reply.json()["data"]])
    torch.testing.assert_close(got[1], clip.embed_images([str(WORLD[1])])[0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(got[0], clip.embed_texts(["a red circle"])[0], rtol=1e-4, atol=1e-5)
    labels = ["a yellow square", "a blue star", "two shapes"]
    reply = server.post("/v1/classify", json={"image": data_url(WORLD[0]), "labels": labels,
                                              "template": "a photo of {}."}).json()
    want = clip.classify(str(WORLD[0]), labels, template="a photo of {}.")
    assert reply["probability"] == "sigmoid" and reply["object"] == "classification"
    assert [(x["label"], pytest.approx(x["probability"], rel=1e-4)) for x in reply["labels"]] == want
    models = {m["id"] for m in server.get("/v1/models").json()["data"]}
    assert models == {"nanopali-default", "tiny-siglip"}


def test_a_server_without_a_siglip_says_how_to_get_one(small_server):
    reply = small_server.post("/v1/classify", json={"image": data_url(WORLD[0]), "labels": "a"})
    assert reply.status_code == 404 and "--siglip" in reply.json()["error"]["message"]
