"""What the drafts would reach if they knew more: bounds that say where tokens per forward are lost.

Every pass of the decoding loop verifies drafts made in the pass before, next to a token that
pass then rejected (or next to a bonus token it had not seen). This script replays lossless
greedy decoding of a trained adapter and, after every pass, may replace the drafts by what the
predictive stream makes of them once it knows the token just committed: an extra predictive
pass over [that token, the drafts], *not counted* as a forward call. It measures how much is
lost to that one token, and how much a given way of recovering it could win:

  plain          the loop as `decode` runs it (the baseline; must match the card's figure)
  refresh-all    every draft remade knowing the last committed token (the bound)
  refresh-first  only the first draft remade
  branches       what one call could carry: for each of the first B slots a hypothesis branch
                 [the previous pass's second choice for that slot, placeholders …]; when the
                 pass rejects that slot and the correction is that second choice, the next
                 drafts are the branch's. Costs B·(γ+1) more tokens per call, not simulated.
  blank          after every pass, the drafts the predictive stream makes with a placeholder
                 where the correction (or bonus) goes: no hypothesis about it needed. This is
                 what `DecodeOptions(blank_branches=True)` computes inside the one call

The output must stay token-identical to the greedy transcripts (checked). Examples come from the
training recipe's caches (encoder states + greedy transcripts), e.g.

    python eval/draft_bounds.py --model base --examples ~/.cache/crosswhisper/training/base/dev-40.pt --mode refresh-all
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import torch

from crosswhisper.acceptance import AcceptanceRule, DraftBuffer, verify_greedy
from crosswhisper.lora import load_adapter, shipped_adapter
from crosswhisper.whisper import dual_streams, get_bundle, special_id

MODES = ("plain", "refresh-all", "refresh-first", "branches", "blank")


def replay(bundle, adapted, example, gamma: int, mode: str, branches: int) -> tuple[int, int, int]:
    """Tokens, counted forward calls, and branch hits of one example (lossless greedy)."""
    prompt = example.tokens[: example.prompt_length].tolist()
    reference = example.tokens[example.prompt_length :].tolist()
    eot = special_id(bundle, "<|endoftext|>")
    hidden = example.encoder_states.to(bundle.model.dtype)
    streams = dual_streams(bundle, hidden, len(prompt), adapted=adapted, drafting=True)
    streams.reset(1)
    buffer = DraftBuffer.empty(1, gamma, streams.vocab_size, placeholder=eot, proposals=False)
    rule = AcceptanceRule(gamma=gamma)
    hypotheses = torch.full((gamma,), -1)  # per slot: the token a branch assumes there
    tokens, calls, hits = [], 0, 0
    pending = torch.tensor([prompt])
    while True:
        # room for the uncounted extra pass as well
        fit = min(gamma, streams.max_length - streams.length - pending.shape[1] - gamma - 1)
        drafts, valid = buffer.tokens[:, :fit], buffer.valid[:, :fit]
        verified = drafts[0].clone()  # the buffer is refilled below
        out = streams.forward_block(pending, drafts)
        calls += 1
        n, correction = verify_greedy(out.control_logits.float(), drafts, valid, rule)
        n, correction = int(n[0]), int(correction[0])
        new = buffer.tokens[0, :n].tolist() + [correction]
        if eot in new:
            tokens += new[: new.index(eot) + 1]
            break
        tokens += new
        if len(tokens) >= len(reference):  # a transcript cut at the token limit
            break
        top2 = out.predictive_logits[0].float().topk(2, dim=-1).indices
        buffer.refill(n, top2[:, 0], None)
        if mode == "blank":
            # keep all but the last committed token, then run it again followed by placeholders
            committed = torch.cat([pending[0], verified[:n]])
            streams.commit(committed.shape[0] - 1)
            blank = streams.forward_block(committed[-1:].view(1, 1), torch.full((1, gamma), eot))
            streams.commit(1)
            buffer.tokens[0], buffer.valid[0] = blank.predictive_logits[0, 1:].float().argmax(-1), True
        else:
            streams.commit(pending.shape[1] + n)
        pending = torch.tensor([[correction]])
        hit = mode == "branches" and n < min(branches, fit) and int(hypotheses[n]) == correction
        hits += hit
        if mode in ("refresh-all", "refresh-first") or hit:
            # what the predictive stream drafts once it knows `correction` (a branch holds
            # placeholders after its hypothesis, not the drafts)
            inputs = buffer.tokens[:, :gamma] if not hit else torch.full((1, gamma), eot)
            fresh = streams.forward_block(pending, inputs).predictive_logits[0].float()
            streams.commit(0)
            if mode == "refresh-first":
                buffer.tokens[0, 0], buffer.valid[0, 0] = fresh[0].argmax(), True
            else:
                buffer.tokens[0], buffer.valid[0] = fresh[:gamma].argmax(-1), True
                top2 = torch.cat([top2[: n + 1], fresh.topk(2, dim=-1).indices])  # their second choices
        # the next pass's hypotheses: the second choice for every slot it will verify
        hypotheses = top2[n + 1 :, 1][:gamma]
        hypotheses = torch.cat([hypotheses, torch.full((gamma - hypotheses.shape[0],), -1)])
    if tokens != reference[: len(tokens)]:
        raise AssertionError(f"{example.utterance}: not the greedy transcript")
    return len(tokens), calls, hits


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="base")
    parser.add_argument("--adapter", type=Path, default=None, help="default: the shipped adapter")
    parser.add_argument("--examples", type=Path, required=True, help="a recipe cache: train-N.pt, dev-N.pt or test-clean.pt")
    parser.add_argument("--gamma", type=int, default=4)
    parser.add_argument("--mode", choices=MODES, default="plain")
    parser.add_argument("--branches", type=int, default=4, help="slots with a hypothesis branch (--mode branches)")
    parser.add_argument("--max-utterances", type=int, default=40)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    bundle = get_bundle(args.model)
    adapted = load_adapter(bundle, args.adapter or shipped_adapter(args.model))
    if not args.examples.is_file():
        raise SystemExit(f"{args.examples}: no such file (run recipes/train_whisper_adapter.py once: it writes them)")
    examples = torch.load(args.examples, weights_only=False)["examples"][: args.max_utterances]
    tokens = calls = hits = 0
    for example in examples:
        t, c, h = replay(bundle, adapted, example, args.gamma, args.mode, args.branches)
        tokens, calls, hits = tokens + t, calls + c, hits + h
    extra = f", branch taken in {hits} of {calls} calls" if args.mode == "branches" else ""
    print(f"{args.examples.name} ({len(examples)} utt.) γ={args.gamma} {args.mode}: {tokens / calls:.3f} tokens/forward{extra}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
