"""Exploration (run as: python explore.py 80, 80 windows, the last 16 validate): variants of the seam map on SmolLM2 block K=8 (11..18); killed after the ridge rows (the shared machine was too slow)."""
import sys
import time

import torch

import depthprobe
from depthprobe.data import heldout_windows, make_windows
from depthprobe.model.stack import LayerStack
from depthprobe.prune.repair import fuse_map, solve_cosine, solve_linear
from depthprobe.prune.select import Evaluator

torch.set_num_threads(1)
N_FIT = int(sys.argv[1]) if len(sys.argv) > 1 else 80
model, tok = depthprobe.load_model("smollm2", dtype="float32", device="cpu")
model.eval()
stack = LayerStack.from_model(model)
win = make_windows(tok, num_sequences=N_FIT, seq_len=256)
held = heldout_windows(tok, num_sequences=16, seq_len=256, calibration=win)
n_val = N_FIT // 5
fit_ids, val_ids = win.input_ids[:-n_val], win.input_ids[-n_val:]
val_ev = Evaluator(stack, val_ids, 4)
held_ev = Evaluator(stack, held.input_ids, 4)
full_h = held_ev.loss([])
print("full held", full_h, flush=True)


@torch.no_grad()
def capture(ids, p, e):
    """u (down_proj input), m (down_proj out), x_p-out of block p, x_e target."""
    blk = stack.blocks[p]
    got = {k: [] for k in ("u", "m", "xs", "xe")}

    class Stop(Exception):
        pass

    def h_down(mod, a, o):
        got["u"].append(a[0].reshape(-1, a[0].shape[-1]))
        got["m"].append(o.reshape(-1, o.shape[-1]))

    def h_p(mod, a, o):
        got["xs"].append((o[0] if isinstance(o, tuple) else o).reshape(-1, 576))

    def h_e(mod, a, o):
        got["xe"].append((o[0] if isinstance(o, tuple) else o).reshape(-1, 576))
        raise Stop

    hs = [blk.mlp.down_proj.register_forward_hook(h_down), blk.register_forward_hook(h_p),
          stack.blocks[e - 1].register_forward_hook(h_e)]
    try:
        for s in range(0, ids.shape[0], 4):
            try:
                model(input_ids=ids[s:s + 4], use_cache=False)
            except Stop:
                pass
    finally:
        for h in hs:
            h.remove()
    return {k: torch.cat(v) for k, v in got.items() if v}


def evaluate(removed, name):
    v = val_ev.loss(removed)
    h = held_ev.loss(removed)
    return v, h


def run(removed, p, e):
    t = time.time()
    st = capture(fit_ids, p, e)
    print("captured", time.time() - t, flush=True)
    m, xs, xe, u = st["m"], st["xs"], st["xe"], st["u"]
    y = xs - m
    r = xe - y
    W = stack.blocks[p].mlp.down_proj.weight.detach().clone()
    plain_v, plain_h = evaluate(removed, "plain")
    gap = plain_h - full_h
    print(f"removed {removed}: plain val {plain_v:.4f} held {plain_h:.4f} gap {gap:.4f}", flush=True)
    wnorm = 1 / xe.norm(dim=-1).clamp_min(1e-6)
    tokpos = torch.arange(xe.shape[0]) % 256
    not0 = tokpos > 0

    def report(tag, setter):
        setter()
        v, h = evaluate(removed, tag)
        stack.blocks[p].mlp.down_proj.weight.data.copy_(W)
        print(f"  {tag:40s} val {v:.4f} ({plain_v - v:+.4f})  held {h:.4f} rec {(plain_h - h) / gap:.3f}", flush=True)

    def fuse_T(T):
        return lambda: fuse_map(stack.blocks[p].mlp.down_proj, T)

    for weighting in ("norm", "none"):
        w = wnorm if weighting == "norm" else None
        for ridge in (1e-3, 1e-2, 1e-1, 1.0):
            T = solve_linear(m, r, ridge, w)
            report(f"map {weighting} ridge={ridge}", fuse_T(T))
    T = solve_linear(m[not0], r[not0], 1e-2, wnorm[not0])
    report("map norm ridge=1e-2 skip pos0", fuse_T(T))
    # refit the writer weight: u A ≈ r, ridge toward W^T
    for weighting in ("norm", "none"):
        ww = wnorm if weighting == "norm" else torch.ones_like(wnorm)
        U = u.double() * ww.double()[:, None]
        R = r.double() * ww.double()[:, None]
        A0 = W.double().T
        G = U.T @ U
        B = U.T @ R
        for ridge in (1e-3, 1e-2, 1e-1, 1.0):
            lam = ridge * torch.trace(G) / G.shape[0]
            A = torch.linalg.solve(G + lam * torch.eye(G.shape[0], dtype=torch.float64), B + lam * A0)
            report(f"refit {weighting} ridge={ridge}", lambda A=A: stack.blocks[p].mlp.down_proj.weight.data.copy_(A.T.float()))
    T = solve_linear(m, r, 1e-2, wnorm)
    Tc = solve_cosine(m, y, xe, T, steps=300)
    report("cosine from map norm 1e-2", fuse_T(Tc))


run(list(range(11, 19)), 10, 19)
run(list(range(13, 19)), 12, 19)
