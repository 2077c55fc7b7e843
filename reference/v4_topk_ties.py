"""Count exact ties at the indexer's top-k boundary of a DeepSeek-V4 transformers directory on
results/v4-roundtrip/ids100.json (why mnemo and torch.topk can pick different entries).
Usage: python reference/v4_topk_ties.py HF_DIR   (transformers==5.23.0)
"""
import json, torch, sys
from transformers import DeepseekV4ForCausalLM
import transformers.models.deepseek_v4.modeling_deepseek_v4 as m
ids = json.load(open("results/v4-roundtrip/ids100.json"))
model = DeepseekV4ForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32, attn_implementation="eager", experts_implementation="eager").eval()
out = []
orig = m.DeepseekV4IndexerScorer.forward
def hook(self, q, ckv, hs):
    s = orig(self, q, ckv, hs); out.append(s.detach()); return s
m.DeepseekV4IndexerScorer.forward = hook
with torch.no_grad(): model(torch.tensor([ids]))
k = model.config.index_topk
for li, s in enumerate(out):
    s = s[0]; T, E = s.shape
    ties = small = rows = zeros = 0
    for t in range(T):
        vis = (t + 1) // 4
        if vis <= k: continue
        row = s[t, :vis]; rows += 1
        v = row.sort(descending=True).values
        gap = (v[k-1] - v[k]).item()
        zeros += int((row == 0).sum().item())
        if gap == 0: ties += 1
        elif gap < 1e-5 * max(1.0, v.abs().max().item()): small += 1
    print(f"indexer {li}: rows that choose {rows}, tie at the boundary {ties}, gap<1e-5 {small}, exact-zero scores {zeros}")
