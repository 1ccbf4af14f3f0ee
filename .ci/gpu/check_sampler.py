# The static-cache sampler on CUDA: graph replay draws exactly what the same Decoder run eagerly draws,
# also after the weights change in place (as an optimizer step changes them); then tokens/s, graph vs eager.
# Exits 1 if fewer than 90% of the completions agree.
import contextlib
import sys
import time

sys.path.insert(0, ".")
import torch  # noqa: E402

import sample  # noqa: E402
from model import GPT, GPTConfig  # noqa: E402


@contextlib.contextmanager
def captured(capture):
    """Every Decoder made inside captures CUDA graphs (True) or runs its steps eagerly (False)."""
    init = sample.Decoder.__init__
    sample.Decoder.__init__ = lambda self, *args, capture=None: init(self, *args, capture=capture_flag)
    capture_flag = capture
    sample._decoders.clear()
    try:
        yield
    finally:
        sample.Decoder.__init__ = init
        sample._decoders.clear()


def draw(prompts, seed, batch_size=512):
    return sample.generate(model, prompts, 48, stop_at_eot=False, batch_size=batch_size,
                           generator=torch.Generator(device="cuda").manual_seed(seed))


def agree(a, b):
    return sum(x == y for x, y in zip(a, b))


torch.manual_seed(0)
model = GPT(GPTConfig(block_size=256)).cuda().eval()
g = torch.Generator().manual_seed(0)
prompts = [torch.randint(0, 50256, (int(n),), generator=g).tolist() for n in torch.randint(2, 9, (700,), generator=g)]
original = {k: v.clone() for k, v in model.state_dict().items()}
with captured(True):
    graph = draw(prompts, 1)  # 512 + 188 rows: buckets of 512 and 256
    draw(prompts[:300], 2)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1.05)  # in place, as an optimizer step: the captured graphs must read the new weights
    graph_after = draw(prompts[:300], 2)
with captured(False):
    eager_after = draw(prompts[:300], 2)
    model.load_state_dict(original)  # copies in place
    eager = draw(prompts, 1)
print(f"graph vs eager: {agree(graph, eager)}/{len(graph)} completions identical")
print(f"after an in-place weight change: {agree(graph_after, eager_after)}/300 identical")
for capture in (True, False):
    for rows in (256, 1024):
        batch = (prompts * 2)[:rows]
        with captured(capture):
            draw(batch, 0, rows)  # warm-up (and capture)
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(3):
                draw(batch, 0, rows)
            torch.cuda.synchronize()
            seconds = (time.perf_counter() - t0) / 3
        print(f"{'graph' if capture else 'eager'} batch {rows}: {rows * 48 / seconds:,.0f} tokens/s ({seconds / 47 * 1e3:.2f} ms a step)")
if agree(graph, eager) < 0.9 * len(graph) or agree(graph_after, eager_after) < 270:
    print("SAMPLER CHECK FAILED")
    sys.exit(1)
print("sampler check passed")
