"""Continuous batching (inference/batching.py, Pali.row/batch/result): rows that join a running batch at any step
and leave it when done get what `generate` gives each of them alone; an error or a cancel stays in its row."""

import numpy as np
import pytest
import torch
from tiny_checkpoint import write_tiny_checkpoint

import nanopali
from nanopali.errors import UsageError
from nanopali.inference.answers import generate_answers

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def pali(tmp_path_factory):
    return nanopali.load(write_tiny_checkpoint(tmp_path_factory.mktemp("tiny"), generation=2))  # window 8 < prompts


@pytest.fixture(scope="module")
def images():
    rng = np.random.default_rng(5)
    return [rng.integers(0, 256, (20 + 7 * i, 40 - 3 * i, 3), dtype=np.uint8) for i in range(5)]


PROMPTS = ["caption en", "answer en what is this?", "ocr", "detect cat ; dog", "caption es"]


def run(batch, rows, join_at):
    """Step the batch, adding rows[i] at step join_at[i]; return how many steps it took."""
    step, pending = 0, sorted(zip(join_at, range(len(rows))))
    while batch or pending:
        batch.add([rows[i] for at, i in pending if at <= step])
        pending = [(at, i) for at, i in pending if at > step]
        batch.step()
        step += 1
    return step


def alone(pali, image, prompt, **options):
    (answer,) = generate_answers(pali.model, pali.processor, [image], [prompt], runtime=pali.runtime, **options)
    return answer


def test_rows_joining_at_any_step_get_what_they_get_alone(pali, images):
    lengths = [12, 5, 9, 7, 3]
    rows = [pali.row(im, p, max_new_tokens=n) for im, p, n in zip(images, PROMPTS, lengths)]
    run(pali.batch(), rows, join_at=[0, 0, 2, 4, 6])
    for row, image, prompt, n in zip(rows, images, PROMPTS, lengths):
        expected = alone(pali, image, prompt, max_new_tokens=n)
        assert row.answer.text == expected.text, f"{prompt!r} joined a running batch and its answer changed"
        assert [s for s, _ in row.answer.spans] == [s for s, _ in expected.spans]
        assert np.allclose([lp for _, lp in row.answer.spans], [lp for _, lp in expected.spans], atol=1e-4)
        assert row.finish_reason in ("stop", "length") and len(row.tokens) <= n


def test_sampled_rows_follow_their_own_generators(pali, images):
    """Two sampling rows, a greedy one and one with a repetition penalty in one batch: each equals its own run alone."""
    opts = [dict(do_sample=True, temperature=1.5, top_k=50, seed=1),
            dict(do_sample=True, temperature=0.9, top_p=0.8, seed=2), {}, dict(repetition_penalty=1.8)]

    def kwargs(o):
        o = dict(o)
        seed = o.pop("seed", None)
        return o | ({"generator": torch.Generator().manual_seed(seed)} if seed is not None else {})
    rows = [pali.row(images[i], "caption en", max_new_tokens=10, **kwargs(o)) for i, o in enumerate(opts)]
    run(pali.batch(), rows, join_at=[0, 1, 1, 2])
    for i, (row, o) in enumerate(zip(rows, opts)):
        assert row.answer.text == alone(pali, images[i], "caption en", max_new_tokens=10, **kwargs(o)).text
    for i, what in ((0, "sampling"), (3, "the penalty")):
        greedy = alone(pali, images[i], "caption en", max_new_tokens=10).text
        assert rows[i].answer.text != greedy, f"{what} changed nothing"


def test_a_cancelled_row_leaves_at_the_next_step_and_the_others_go_on(pali, images):
    rows = [pali.row(images[i], PROMPTS[i], max_new_tokens=12, min_new_tokens=12) for i in range(3)]
    batch = pali.batch()
    batch.add(rows)
    batch.step()
    batch.step()
    rows[1].cancel()
    ended = batch.step()
    assert ended == [rows[1]] and rows[1].finish_reason == "cancelled" and len(rows[1].tokens) == 2
    assert len(batch) == 2 and batch.state.kv_valid.shape[0] == 2, "the cancelled row still takes a cache row"
    while batch:
        batch.step()
    for i in (0, 2):
        assert rows[i].answer.text == alone(pali, images[i], PROMPTS[i], max_new_tokens=12, min_new_tokens=12).text


def test_a_row_that_fails_its_prefill_fails_alone(pali, images):
    good = [pali.row(images[i], PROMPTS[i], max_new_tokens=6) for i in range(2)]
    bad = pali.row(images[2], "ocr", max_new_tokens=6)
    bad.image = "no such file.png"  # fails in the processor, inside the joining group's prefill
    batch = pali.batch()
    batch.add([good[0], bad, good[1]])
    ended = batch.step()
    assert ended == [bad] and bad.finish_reason == "error" and isinstance(bad.error, FileNotFoundError)
    while batch:
        batch.step()
    for i, row in enumerate(good):
        assert row.answer.text == alone(pali, images[i], PROMPTS[i], max_new_tokens=6).text


def test_the_cache_holds_the_rows_not_the_time_the_batch_has_run(pali, images):
    """New rows keep joining for 90 steps; the cache never grows past twice the longest row's prompt + answer
    (the widest row so far, plus the most room a row still needs), which is less than the steps run."""
    batch, rows, longest = pali.batch(), [], 0
    for step in range(90):
        if step % 3 == 0:
            rows.append(pali.row(images[step % 5], PROMPTS[step % 5], max_new_tokens=8, min_new_tokens=8))
            batch.add([rows[-1]])
            longest = max(longest, rows[-1].prompt_tokens + 8)
        batch.step()
        assert batch.state is None or batch.state.cache.max_len <= 2 * longest < 90
    assert all(r.done for r in rows[:-3]) and all(len(r.tokens) == 8 for r in rows if r.done)


def test_stop_strings_and_lengths_end_rows(pali, images):
    free = alone(pali, images[0], "caption en", max_new_tokens=12).text
    stop = free[3:5]
    rows = [pali.row(images[0], "caption en", max_new_tokens=12, stop_strings=[stop]),
            pali.row(images[0], "caption en", max_new_tokens=2)]
    run(pali.batch(), rows, join_at=[0, 0])
    assert rows[0].finish_reason == "stop" and stop in rows[0].answer.text and free.startswith(rows[0].answer.text)
    assert rows[1].finish_reason == "length" and len(rows[1].tokens) == 2


def test_rows_are_checked_before_they_join(pali, images):
    with pytest.raises(UsageError, match="beam search cannot join"):
        pali.row(images[0], "caption en", num_beams=2)
    limit = pali.model.config.text_config.max_position_embeddings
    with pytest.raises(UsageError, match=f"takes at most {limit}"):
        pali.row(images[0], "caption en", max_new_tokens=limit)
    with pytest.raises(UsageError, match="eos_token_id"):
        pali.row(images[0], "caption en", eos_token_id=3)
    with pytest.raises(UsageError, match="top_p"):
        pali.row(images[0], "caption en", top_p=2.0)
    with pytest.raises(nanopali.errors.ImageTooLargeError):
        pali.row(images[0], "caption en", max_pixels=100)
    row = pali.row(images[0], "answer en " + "why " * 20)  # no max_new_tokens: the task's, cut to what fits
    assert row.options.max_new_tokens == 32


def test_result_parses_objects_as_detect_does(pali, images):
    row = pali.row(images[0], "detect cat ; dog", max_new_tokens=6)
    run(pali.batch(), [row], join_at=[0])
    objects = pali.result(row)
    assert objects.text == row.answer.text == pali.detect(images[0], ["cat", "dog"], max_new_tokens=6).text
