"""Drive `mnemo serve` with the official `openai` Python package: completions, chat,
streaming (both), and error cases. Exits non-zero on any failure; writes a JSON record.

    reference/.venv/bin/python scripts/serve-openai-client.py \
        --model models/SmolLM2-135M-Instruct.Q4_1.gguf --out results/serve/openai-client.json
"""
import argparse
import json
import os
import sys
import time

import openai

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from serve_common import Server, repo_root  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--mnemo", default=os.path.join(repo_root(), "target/release/mnemo"))
    ap.add_argument("--model", required=True)
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    record = {"openai_version": openai.__version__, "checks": []}

    def check(name, ok, detail):
        record["checks"].append({"name": name, "ok": bool(ok), "detail": detail})
        print(("PASS " if ok else "FAIL ") + name + ": " + json.dumps(detail)[:300])

    with Server(a.mnemo, a.model, "--api-key", "test-key") as srv:
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key="test-key", max_retries=0)
        models = client.models.list()
        check("models.list", len(models.data) == 1, [m.id for m in models.data])
        name = models.data[0].id

        r = client.completions.create(model=name, prompt="The capital of France is",
                                      max_tokens=12, temperature=0)
        check("completions.create", r.choices[0].text and r.usage.completion_tokens <= 12,
              {"text": r.choices[0].text, "finish": r.choices[0].finish_reason,
               "usage": r.usage.model_dump()})

        r = client.chat.completions.create(
            model=name, messages=[{"role": "user", "content": "What is 2 + 2? Answer briefly."}],
            max_tokens=24, temperature=0, seed=1)
        msg = r.choices[0].message
        check("chat.completions.create", msg.role == "assistant" and msg.content,
              {"content": msg.content, "finish": r.choices[0].finish_reason,
               "usage": r.usage.model_dump()})

        t0 = time.time()
        chunks, ttft = [], None
        stream = client.chat.completions.create(
            model=name, messages=[{"role": "user", "content": "Name three colours."}],
            max_tokens=32, temperature=0, stream=True, stream_options={"include_usage": True})
        usage = None
        for ch in stream:
            if ch.usage:
                usage = ch.usage.model_dump()
            for c in ch.choices:
                if c.delta.content:
                    if ttft is None:
                        ttft = time.time() - t0
                    chunks.append(c.delta.content)
        text = "".join(chunks)
        nonstream = client.chat.completions.create(
            model=name, messages=[{"role": "user", "content": "Name three colours."}],
            max_tokens=32, temperature=0).choices[0].message.content
        check("chat streaming == non-streaming", text == nonstream and usage is not None,
              {"text": text, "chunks": len(chunks), "ttft_s": ttft, "usage": usage})

        stream = client.completions.create(model=name, prompt="def fibonacci(n):",
                                           max_tokens=24, temperature=0, stream=True)
        text = "".join(c.choices[0].text for c in stream if c.choices)
        check("completions streaming", len(text) > 0, {"text": text})

        r = client.completions.create(model=name, prompt="1, 2, 3, 4,", max_tokens=30,
                                      temperature=0, stop=[" 7"])
        check("stop sequence", " 7" not in r.choices[0].text and r.choices[0].finish_reason == "stop",
              {"text": r.choices[0].text, "finish": r.choices[0].finish_reason})

        a1 = client.completions.create(model=name, prompt="Once upon a time", max_tokens=16,
                                       temperature=1.0, seed=1234).choices[0].text
        a2 = client.completions.create(model=name, prompt="Once upon a time", max_tokens=16,
                                       temperature=1.0, seed=1234).choices[0].text
        check("seed determinism", a1 == a2, {"a": a1, "b": a2})

        try:
            client.completions.create(model=name, prompt="x", max_tokens=-3)
            check("negative max_tokens -> 400", False, "no error")
        except openai.BadRequestError as e:
            check("negative max_tokens -> 400", e.status_code == 400, e.body)

        try:
            client.chat.completions.create(model=name, messages=[{"role": "user", "content": "x"}],
                                           max_tokens=10, temperature="hot")
            check("wrong type -> 400", False, "no error")
        except openai.BadRequestError as e:
            check("wrong type -> 400", e.status_code == 400 and e.body.get("param") == "temperature",
                  e.body)

        try:
            client.completions.create(model=name, prompt="word " * 20000, max_tokens=5)
            check("prompt over the context -> 400", False, "no error")
        except openai.BadRequestError as e:
            check("prompt over the context -> 400", e.code == "context_length_exceeded", e.body)

        try:
            client.chat.completions.create(model="gpt-4o", max_tokens=4,
                                           messages=[{"role": "user", "content": "x"}])
            check("unknown model -> 404", False, "no error")
        except openai.NotFoundError as e:
            check("unknown model -> 404", e.status_code == 404 and e.code == "model_not_found",
                  e.body)

        bad = openai.OpenAI(base_url=srv.url + "/v1", api_key="wrong", max_retries=0)
        try:
            bad.models.list()
            check("wrong API key -> 401", False, "no error")
        except openai.AuthenticationError as e:
            check("wrong API key -> 401", e.status_code == 401, e.body)

    ok = all(c["ok"] for c in record["checks"])
    record["all_passed"] = ok
    if a.out:
        with open(a.out, "w") as f:
            json.dump(record, f, indent=2)
    print("ALL PASSED" if ok else "SOME FAILED")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
