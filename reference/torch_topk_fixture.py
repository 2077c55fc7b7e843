"""Which entries `torch.topk` (CPU, largest) picks when values tie: the oracle of
crates/mnemo/src/kernels/torch_topk.rs.

transformers' DeepSeek-V4 indexer selects compressed entries with `index_scores.topk(k)` over
a row of every entry, the not-yet-visible ones at -inf. Entries whose every indexer head is
ReLU-zeroed score exactly 0, so small random models often tie at the top-k boundary; which of
the tied entries torch keeps is fixed by ATen's CPU kernel (libstdc++ `std::nth_element`, or
`std::partial_sort` when k * 64 <= n). This records, for rows full of ties (a few distinct
values, zeros, -inf tails) of many lengths and k (both algorithms), the set of indices torch
returns.

Usage: python reference/torch_topk_fixture.py OUT.json   (any recent torch; CPU)
"""
import json
import sys

import torch

VALUES = [0.0, 1.5, -2.0, 0.25, 3.0]  # row codes "0".."4"; "-" is -inf
g = torch.Generator().manual_seed(7)
cases = []
lengths = list(range(2, 40)) + [47, 64, 65, 100, 129, 255, 256, 257, 1000, 4096]
for n in lengths:
    for rep in range(3):
        distinct = 1 + int(torch.randint(0, 5, (1,), generator=g))
        codes = torch.randint(0, distinct, (n,), generator=g)
        tail = int(torch.randint(0, n // 2 + 1, (1,), generator=g)) if rep > 0 else 0
        row = torch.tensor(VALUES)[codes]
        if tail:
            row[n - tail:] = float("-inf")
        text = "".join(str(c) for c in codes[: n - tail].tolist()) + "-" * tail
        ks = sorted({k for k in (1, n // 3, n - tail - 1, n // 64, n) if 1 <= k <= n})
        sets = [sorted(row.topk(k).indices.tolist()) for k in ks]
        cases.append(dict(codes=text, ks=ks, sets=sets))
json.dump(dict(torch=torch.__version__, values=VALUES, cases=cases), open(sys.argv[1], "w"),
          separators=(",", ":"))
print(f"{len(cases)} rows, {sum(len(c['ks']) for c in cases)} selections, torch {torch.__version__}")
