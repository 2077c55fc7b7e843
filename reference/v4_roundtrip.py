"""Round trip: a mnemo-trained DeepSeek-V4 run exported with `mnemo export RUN --format hf`
loads in transformers 5.23.0 and gives mnemo's logits.

Usage (repo root; the venv of reference/requirements-v4.txt):
  target/release/mnemo export runs/v4 --out /tmp/v4hf
  echo '[...ids...]' > /tmp/ids.json
  target/release/mnemo logits /tmp/v4hf --ids-file /tmp/ids.json --out /tmp/mnemo.safetensors
  reference/.venv-v4/bin/python reference/v4_roundtrip.py /tmp/v4hf /tmp/ids.json /tmp/mnemo.safetensors
Prints the max |Δlogit| and the largest logit; exits 1 if Δ > 1e-4 of it.
"""
import json
import sys

import torch
import transformers
from safetensors.torch import load_file

assert transformers.__version__ == "5.23.0", transformers.__version__
from transformers import DeepseekV4ForCausalLM  # noqa: E402

model_dir, ids_path, mnemo_path = sys.argv[1:4]
ids = json.load(open(ids_path))
ids = ids["input_ids"] if isinstance(ids, dict) else ids
m = DeepseekV4ForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="eager",
                                          experts_implementation="eager")
m.eval()
with torch.no_grad():
    want = m(torch.tensor([ids])).logits[0]
got = load_file(mnemo_path)["logits"]
diff = (got - want).abs().max().item()
top = want.abs().max().item()
print(json.dumps({"model": model_dir, "tokens": len(ids), "max_abs_diff": diff, "max_abs_logit": top,
                  "argmax_agree": float((got.argmax(-1) == want.argmax(-1)).float().mean())}))
sys.exit(0 if diff <= 1e-4 * max(top, 1.0) else 1)
