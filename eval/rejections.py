"""What the rejected drafts are (issue #21, the lossy regime): for every verification that
stops before the last real draft, the first rejected draft against the control stream's
choice there: their probabilities under the control stream, the draft's rank, and whether
Whisper's text normaliser would see a difference. A relaxed rule can only gain where a
rejection is a near miss (close probability, same words, neighbouring timestamps).

    python eval/rejections.py --model tiny.en --utterances 40

Decodes held-out utterances with `transcribe()`'s defaults (timestamps, γ for the CPU,
lossless); the greedy check is observed by wrapping `decoding.verify_greedy`.
"""

from __future__ import annotations

import argparse
import collections
import re
from pathlib import Path

import crosswhisper.decoding as decoding
from crosswhisper.audio import load_audio
from crosswhisper.whisper.transcribe import get_bundle, transcribe

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "LibriSpeech" / "train-clean-5"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="tiny.en")
    parser.add_argument("--data", type=Path, default=SHARED)
    parser.add_argument("--speakers", nargs="+", default=["1088", "3526"], help="held out by the shipped adapters")
    parser.add_argument("--utterances", type=int, default=40)
    parser.add_argument("--examples", type=int, default=20, help="rejections to print")
    args = parser.parse_args(argv)

    rejections = []  # (slot, draft, control's choice, p(draft), p(choice), rank of the draft)
    verify = decoding.verify_greedy

    def observed(P_logits, drafts, valid, rule, q_hat=None, exact_only=None):
        n, next_token = verify(P_logits, drafts, valid, rule, q_hat, exact_only)
        k = int(n[0])
        if k < int(valid[0].sum()):
            p = P_logits[0, k].float().softmax(-1)
            draft, choice = int(drafts[0, k]), int(p.argmax())
            rejections.append((k, draft, choice, float(p[draft]), float(p[choice]), int((p > p[draft]).sum())))
        return n, next_token

    decoding.verify_greedy = observed
    bundle = get_bundle(args.model)
    tokenizer = bundle.tokenizer
    files = sorted(p for s in args.speakers for p in (args.data / s).rglob("*") if p.suffix in (".flac", ".opus"))
    calls = tokens = 0
    for path in files[: args.utterances]:
        result = transcribe(load_audio(path), model=bundle)
        calls += result.stats.forward_calls
        tokens += result.stats.generated_tokens

    first_timestamp = tokenizer.convert_tokens_to_ids("<|0.00|>")

    def words(token: int) -> str:  # what the normaliser keeps of a token, roughly
        return re.sub(r"[^a-z0-9']", "", tokenizer.decode([token]).lower())

    def timestamp(token: int) -> bool:
        return token >= first_timestamp

    count = len(rejections)
    print(f"{args.model}: {tokens / calls:.2f} tokens per forward, {calls} calls, {count} with a rejected draft")
    share = lambda n: f"{n} ({100 * n / max(count, 1):.0f} %)"  # noqa: E731
    text = [r for r in rejections if not timestamp(r[1]) and not timestamp(r[2])]
    print("  same words after normalising (case, punctuation):", share(sum(words(d) == words(c) for _, d, c, *_ in text)))
    both = [r for r in rejections if timestamp(r[1]) and timestamp(r[2])]
    print("  a timestamp against a timestamp:", share(len(both)), "within 0.02 s:", sum(abs(d - c) <= 1 for _, d, c, *_ in both),
          "within 0.1 s:", sum(abs(d - c) <= 5 for _, d, c, *_ in both))
    print("  a timestamp against text (either way):", share(sum(timestamp(d) != timestamp(c) for _, d, c, *_ in rejections)))
    for ratio in (0.9, 0.5, 0.3, 0.1):
        print(f"  p(draft) ≥ {ratio} · p(choice):", share(sum(pd >= ratio * pc for *_, pd, pc, _ in rejections)))
    print("  rank of the draft:", dict(sorted(collections.Counter(min(r, 5) for *_, r in rejections).items())), "(5: ≥ 5)")
    print("  slot of the rejection:", dict(sorted(collections.Counter(k for k, *_ in rejections).items())))
    for k, d, c, pd, pc, rank in rejections[: args.examples]:
        print(f"    slot {k}: draft {tokenizer.decode([d])!r} p={pd:.3f} (rank {rank}), control {tokenizer.decode([c])!r} p={pc:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
