"""What the side-by-side benchmarks share: a random-init Llama saved with a word-level tokenizer of the
same vocabulary (so sampled ids decode and texts re-tokenise to the same ids), mixed-length
prompt/response texts, alternating timed repetitions, and the last JSON line.

Imported by the bench scripts as `common` (they run as `python bench/<name>.py`)."""
from __future__ import annotations

import json
import statistics
import time
from pathlib import Path
from typing import Any, Callable


def add_model_args(ap, layers=4, hidden=256, vocab=32000) -> None:
    ap.add_argument("--layers", type=int, default=layers)
    ap.add_argument("--hidden", type=int, default=hidden, help="hidden size; heads = hidden / 64")
    ap.add_argument("--vocab", type=int, default=vocab)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--threads", type=int, default=0, help="torch threads for both sides (0: torch's default)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                    help="auto: cuda when a GPU is visible; cpu on a GPU machine hides the GPU from both sides")


def resolve_device(args) -> str:
    """Sets args.device to "cpu" or "cuda". Call before torch is imported: --device cpu hides the GPU
    (CUDA_VISIBLE_DEVICES="") so that stages launched in processes of their own stay on the CPU too."""
    import os

    if args.device == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    import torch

    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    elif args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no GPU is visible")
    return args.device


def device_name(device: str) -> str:
    import torch

    return torch.cuda.get_device_name() if device == "cuda" else "cpu"


def build_tokenizer(vocab: int):
    """Word-level tokenizer: the demo's chat tokens, then words "w5".."w{vocab-1}" split on spaces, the
    demo's chat template (tasks/toy.py), EOS = end of turn."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from selfalign.tasks.toy import ASSISTANT, CHAT_TEMPLATE, END, PAD, SPECIAL_TOKENS, UNK, USER

    words = {t: i for i, t in enumerate(SPECIAL_TOKENS)}
    words.update({f"w{i}": i for i in range(len(SPECIAL_TOKENS), vocab)})
    backend = Tokenizer(models.WordLevel(vocab=words, unk_token=UNK))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.add_special_tokens(SPECIAL_TOKENS)
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token=PAD, unk_token=UNK, eos_token=END,
                                  additional_special_tokens=[USER, ASSISTANT], model_max_length=1 << 16)
    tok.chat_template = CHAT_TEMPLATE
    return tok


def build_model(out: Path, args, max_positions: int = 2048, seed: int | None = None) -> str:
    """A random-init Llama (args.layers, args.hidden, args.vocab; head_dim 64) and its tokenizer,
    saved to `out` through the ordinary save_pretrained."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = build_tokenizer(args.vocab)
    torch.manual_seed(args.seed if seed is None else seed)
    heads = max(1, args.hidden // 64)
    cfg = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=4 * args.hidden,
                      num_hidden_layers=args.layers, num_attention_heads=heads, num_key_value_heads=heads,
                      max_position_embeddings=max_positions, bos_token_id=None, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id, tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg)
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return str(out)


def texts(n: int, lo: int, hi: int, vocab: int, seed: int) -> list[str]:
    """`n` texts of lo..hi random words (uniform length)."""
    import random

    rng = random.Random(seed)
    first = 5  # after the chat tokens
    return [" ".join(f"w{rng.randrange(first, vocab)}" for _ in range(rng.randint(lo, hi))) for _ in range(n)]


def span(s: str) -> tuple[int, int]:
    lo, hi = (int(x) for x in s.split(","))
    return lo, hi


def alternate(sides: dict[str, Callable[[], object]], reps: int) -> dict[str, list[float]]:
    """Runs every side `reps` times, alternating (the order flips each repetition, so drift in the
    machine's load hits both sides alike); returns the wall seconds of each run per side."""
    names = list(sides)
    times: dict[str, list[float]] = {k: [] for k in names}
    for rep in range(reps):
        for name in (names if rep % 2 == 0 else names[::-1]):
            t0 = time.perf_counter()
            sides[name]()
            times[name].append(time.perf_counter() - t0)
            print(f"  rep {rep + 1}/{reps} {name:14s} {times[name][-1]:8.2f} s", flush=True)
    return times


def median(xs):
    return statistics.median(xs)


def emit(bench: str, ours: float, baseline: float, unit: str, ratio: float | None = None, **extra) -> None:
    """The last line of every benchmark: ratio = ours / baseline unless given (> 1: we are better)."""
    ratio = ours / baseline if ratio is None else ratio
    print(json.dumps({"bench": bench, "ours": round(ours, 3), "baseline": round(baseline, 3), "unit": unit,
                      "ratio": round(ratio, 3), **extra}))


def logit_cases(shapes: str, seed: int) -> list[tuple[str, Any]]:
    """(name, float32 logits) for each "rows x vocabulary" of `shapes` (comma-separated), twice:
    peaked (a few dozen tokens hold most of the mass, as a trained model's next-token distribution
    does) and near-uniform (a random-init model's; the nucleus is most of the vocabulary)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    cases = []
    for shape in shapes.split(","):
        b, v = (int(x) for x in shape.lower().split("x"))
        peaked = torch.randn(b, v, generator=g) * 2
        head = min(40, v)
        peaked[:, :head] += 10 + 3 * torch.randn(b, head, generator=g)
        cases.append((f"peaked {b}x{v}", peaked))
        cases.append((f"near-uniform {b}x{v}", torch.randn(b, v, generator=g) * 0.3))
    return cases


def add_logit_args(ap, shapes: str) -> None:
    """The options of the benchmarks that time one sampling step on `logit_cases`."""
    ap.add_argument("--shapes", default=shapes, help="rows x vocabulary, comma-separated")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="tiny sizes, one repetition (smoke test)")


def median_ms(sides: dict[str, Callable[[], object]], reps: int) -> dict[str, float]:
    """One warm-up call of each side, then `reps` alternating repetitions: each side's median, in ms."""
    for f in sides.values():
        f()
    return {k: 1e3 * median(t) for k, t in alternate(sides, reps).items()}


def load_average() -> float:
    try:
        return float(Path("/proc/loadavg").read_text().split()[0])
    except OSError:
        return float("nan")


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
