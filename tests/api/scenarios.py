"""The Batch API as producers use it: the official `openai` package, unchanged, with
`_strict_response_validation=True` (every answer checked against the SDK's own types).

    python scenarios.py SCENARIO

Settings come from the environment (tests/api.rs sets them): SD_BASE (http://HOST:PORT/v1),
SD_KEY (a producer key), SD_KEY2, SD_WORKDIR, and a scenario's own. Each scenario asserts what
the producer sees and prints one JSON line for the Rust test to check against the database and
the mock upstream. Every wait is bounded.
"""
import json
import os
import sys
import time

import openai
from openai import OpenAI

BASE = os.environ["SD_BASE"]
WORK = os.environ.get("SD_WORKDIR", ".")


def client(key=None, **kw):
    return OpenAI(base_url=BASE, api_key=key or os.environ["SD_KEY"], _strict_response_validation=True,
                  max_retries=kw.pop("max_retries", 2), **kw)


def line(custom_id, content, model="gpt-4o-mini", **over):
    l = {"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions",
         "body": {"model": model, "messages": [{"role": "user", "content": content}], "max_tokens": 20}}
    l.update(over)
    return l


def write(name, lines):
    path = os.path.join(WORK, name)
    with open(path, "w") as f:
        for l in lines:
            f.write(l if isinstance(l, str) else json.dumps(l))
            f.write("\n")
    return path


def upload(c, path):
    with open(path, "rb") as f:
        return c.files.create(file=f, purpose="batch")


def wait(c, batch_id, statuses, timeout):
    deadline = time.time() + timeout
    while True:
        b = c.batches.retrieve(batch_id)
        if b.status in statuses:
            return b
        assert time.time() < deadline, f"batch {batch_id} still {b.status} after {timeout} s"
        time.sleep(0.2)


def jsonl(text):
    return [json.loads(x) for x in text.splitlines() if x.strip()]


def expect(exc, f):
    try:
        f()
    except exc as e:
        return e
    raise AssertionError(f"expected {exc.__name__}")


def flow():
    c = client()
    lines = [line(f"flow-{i:03}", f"flow job {i}" + (" [mock:400]" if i == 3 else "")) for i in range(20)]
    path = write("flow.jsonl", lines)
    f = upload(c, path)
    assert f.purpose == "batch" and f.status == "processed" and f.bytes == os.path.getsize(path), f
    assert c.files.retrieve(f.id).id == f.id
    assert c.files.content(f.id).read() == open(path, "rb").read()

    b = c.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h",
                         metadata={"team": "eval"}, extra_body={"priority": "high", "max_cost_usd": 5})
    assert b.status == "validating" and b.metadata == {"team": "eval"}, b
    # The SDK's retry of the same create (no idempotency key): the same batch, not a second.
    again = c.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h",
                             metadata={"team": "eval"}, extra_body={"priority": "high", "max_cost_usd": 5})
    assert again.id == b.id, (again.id, b.id)
    b = wait(c, b.id, {"completed", "failed", "expired", "cancelled"}, 60)
    assert b.status == "completed", b
    assert (b.request_counts.total, b.request_counts.completed, b.request_counts.failed) == (20, 19, 1), b
    assert b.in_progress_at and b.finalizing_at and b.completed_at and b.expires_at == b.created_at + 86400, b
    out = jsonl(c.files.content(b.output_file_id).text)
    err = jsonl(c.files.content(b.error_file_id).text)
    assert sorted(x["custom_id"] for x in out) == [f"flow-{i:03}" for i in range(20) if i != 3]
    assert all(x["response"]["status_code"] == 200 and x["error"] is None for x in out)
    assert [x["custom_id"] for x in err] == ["flow-003"] and err[0]["response"]["status_code"] == 400, err
    outf = c.files.retrieve(b.output_file_id)
    assert outf.purpose == "batch_output" and outf.bytes == len(c.files.content(b.output_file_id).read()), outf
    listed = [x.id for x in c.files.list()]
    assert b.output_file_id in listed and b.error_file_id in listed and f.id in listed, listed
    e = expect(openai.ConflictError, lambda: c.batches.cancel(b.id))
    assert "cannot cancel" in str(e).lower()
    e = expect(openai.NotFoundError, lambda: c.batches.retrieve("batch_nope"))
    assert e.status_code == 404

    # An Idempotency-Key is honoured: the same key, the same batch.
    k = {"Idempotency-Key": "flow-key-1"}
    b2 = c.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="30m",
                          extra_headers=k)
    b2b = c.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="30m",
                           extra_headers=k)
    assert b2.id == b2b.id != b.id
    assert b2.expires_at == b2.created_at + 1800, b2

    # A file that breaks OpenAI's rules: the batch fails, naming each line; nothing is called.
    bad = write("bad.jsonl", [
        line("ok-1", "invalid job ok"),
        "{this is not json",
        {k2: v for k2, v in line("x", "invalid job no id").items() if k2 != "custom_id"},
        line("ok-1", "invalid job duplicate"),
        line("u", "invalid job url", url="/v1/embeddings"),
        line("s", "invalid job stream", body={"model": "gpt-4o-mini", "stream": True,
                                               "messages": [{"role": "user", "content": "invalid job stream"}]}),
        line("m", "invalid job model", model="no-such-model"),
        {k2: v for k2, v in line("n", "invalid job no method").items() if k2 != "method"},
    ])
    fb = upload(c, bad)
    bb = c.batches.create(input_file_id=fb.id, endpoint="/v1/chat/completions", completion_window="24h")
    bb = wait(c, bb.id, {"failed", "in_progress", "completed"}, 30)
    assert bb.status == "failed" and bb.failed_at, bb
    got = [(e.line, e.code, e.param) for e in bb.errors.data]
    assert got == [
        (2, "invalid_json_line", None),
        (3, "missing_required_parameter", "custom_id"),
        (4, "duplicate_custom_id", "custom_id"),
        (5, "invalid_url", "url"),
        (6, "streaming_unsupported", "body.stream"),
        (7, "model_not_found", "body.model"),
        (8, "missing_required_parameter", "method"),
    ], got
    assert bb.output_file_id is None and bb.request_counts.total == 0

    # Invalid creates are 400 with OpenAI's param and code.
    e = expect(openai.BadRequestError, lambda: c.batches.create(
        input_file_id=f.id, endpoint="/v1/embeddings", completion_window="24h"))
    assert e.body["param"] == "endpoint" and e.body["code"] == "invalid_value", e.body
    e = expect(openai.BadRequestError, lambda: c.batches.create(
        input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h", metadata={"tags": ["a"]}))
    assert e.body["param"] == "metadata.tags" and e.body["code"] == "invalid_type", e.body

    # Paged with limit=1, newest first; the SDK follows `after` by itself.
    first = c.batches.list(limit=1)
    assert len(first.data) == 1 and first.has_more and first.data[0].id == bb.id
    ids = [x.id for x in c.batches.list(limit=1)]
    assert ids == [bb.id, b2.id, b.id], ids

    # Another key sees nothing of these, and its asks for them are 404.
    other = client(os.environ["SD_KEY2"])
    assert other.files.list().data == [] and other.batches.list().data == []
    for f_ in (lambda: other.batches.retrieve(b.id), lambda: other.batches.cancel(b2.id),
               lambda: other.files.retrieve(f.id), lambda: other.files.content(b.output_file_id),
               lambda: other.files.delete(f.id)):
        expect(openai.NotFoundError, f_)

    # A key that is not one: 401, AuthenticationError.
    wrong = client("sd-" + "x" * 40, max_retries=0)
    e = expect(openai.AuthenticationError, lambda: wrong.batches.list())
    assert e.body["code"] == "invalid_api_key"
    expect(openai.AuthenticationError, lambda: client("not-a-key", max_retries=0).files.list())

    # Deleting: gone for good.
    d = c.files.delete(f.id)
    assert d.deleted and d.id == f.id
    expect(openai.NotFoundError, lambda: c.files.retrieve(f.id))
    print(json.dumps({"batch": b.id, "idempotent": b2.id, "failed": bb.id}))


def key_works():
    c = client(os.environ["SD_KEY3"], max_retries=0)
    assert c.batches.list().data == []
    print(json.dumps({"ok": True}))


def key_revoked():
    c = client(os.environ["SD_KEY3"], max_retries=0)
    e = expect(openai.AuthenticationError, lambda: c.batches.list())
    assert e.status_code == 401
    print(json.dumps({"ok": True}))


def cancel():
    c = client()
    n = int(os.environ.get("SD_LINES", "2000"))
    f = upload(c, write("cancel.jsonl", [line(f"c-{i:05}", f"cancel job {i}") for i in range(n)]))
    b = c.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h")
    deadline = time.time() + 60
    while c.batches.retrieve(b.id).request_counts.completed < 50:
        assert time.time() < deadline, "no progress"
        time.sleep(0.1)
    cb = c.batches.cancel(b.id)
    returned_ms = time.time() * 1000
    assert cb.status in ("cancelling", "cancelled") and cb.cancelling_at, cb
    assert c.batches.cancel(b.id).status in ("cancelling", "cancelled")  # again: fine
    done = wait(c, b.id, {"cancelled"}, 60)
    assert done.cancelled_at and done.request_counts.total == n, done
    out = jsonl(c.files.content(done.output_file_id).text) if done.output_file_id else []
    err = jsonl(c.files.content(done.error_file_id).text) if done.error_file_id else []
    assert len(out) + len(err) == n, (len(out), len(err))
    assert len(out) == done.request_counts.completed and len(err) == done.request_counts.failed
    assert any(x["error"]["code"] == "batch_cancelled" for x in err)
    print(json.dumps({"batch": b.id, "cancel_returned_ms": returned_ms, "succeeded": len(out), "ended_otherwise": len(err)}))


def large():
    c = client(timeout=300)
    n = int(os.environ["SD_LINES"])
    pad = "x" * int(os.environ.get("SD_PAD", "900"))
    path = os.path.join(WORK, "large.jsonl")
    with open(path, "w") as out:
        for i in range(n):
            out.write(json.dumps(line(f"l-{i:06}", f"large job {i} {pad}")))
            out.write("\n")
    size = os.path.getsize(path)
    t0 = time.time()
    f = upload(c, path)
    t_up = time.time() - t0
    assert f.bytes == size
    b = c.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h")
    b = wait(c, b.id, {"in_progress", "failed"}, 60)
    assert b.status == "in_progress" and b.request_counts.total == n, b
    print(json.dumps({"batch": b.id, "lines": n, "bytes": size, "upload_s": round(t_up, 2),
                      "in_progress_s": round(time.time() - t0, 2)}))


def upload_only():
    c = client()
    n = int(os.environ["SD_LINES"])
    f = upload(c, write("kill.jsonl", [line(f"k-{i:05}", f"kill job {i}") for i in range(n)]))
    print(json.dumps({"file": f.id}))


def create_only():
    c = client()
    b = c.batches.create(input_file_id=os.environ["SD_FILE"], endpoint="/v1/chat/completions",
                         completion_window="24h", metadata={"run": "kill"})
    print(json.dumps({"batch": b.id, "status": b.status}))


def finish():
    c = client()
    b = wait(c, os.environ["SD_BATCH"], {"completed", "failed", "cancelled", "expired"}, 120)
    assert b.status == "completed", b
    batches = [x.id for x in c.batches.list()]
    assert batches == [b.id], batches
    print(json.dumps({"batch": b.id, "completed": b.request_counts.completed, "total": b.request_counts.total}))


def capped():
    c = client()
    ids = []
    for name in ("cap-a", "cap-b"):
        f = upload(c, write(f"{name}.jsonl", [line(f"{name}-{i:03}", f"{name} job {i}") for i in range(30)]))
        ids.append(c.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions",
                                    completion_window="24h").id)
    free = client(os.environ["SD_KEY2"])
    f = upload(free, write("free.jsonl", [line(f"free-{i:03}", f"free job {i}") for i in range(30)]))
    fb = free.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h")
    fb = wait(free, fb.id, {"completed"}, 60)
    print(json.dumps({"capped": ids, "free": fb.id}))


if __name__ == "__main__":
    globals()[sys.argv[1]]()
