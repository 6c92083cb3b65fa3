"""Training the predictive stream: LoRA denoising distillation (Algorithm 3, DESIGN §1.4).

Self-distillation: the frozen base model transcribes the training audio greedily (Whisper; no
human transcripts) or continues the training prompts (text LMs); the teacher is the control
stream on those tokens. The student (adapter on) reads the block it will read at inference —
the last committed token x_c and γ noisy drafts, attending to the *control stream's*
keys/values of the prefix (as `dual_stream.HFDualStream` does, with the same
`dual_stream.block_mask`), causally at x_c and bidirectionally among the drafts — and is
trained with

    s_T = 0 ;  s_t = (s_{t+1} + 1) · 1[argmax q_{t+1} = x_{t+1}]
    L   = − Σ_t (s_t + 1) · p_tᵀ log q_t  /  Σ_t (s_t + 1)

The drafts come from a per-utterance replay buffer of the student's own past argmax
predictions (what inference feeds it), plus random replacement and placeholder tails; or,
closer to inference, from the student's own pass over the block one position earlier, whose
draft at the cut is a wrong one (`draft_source="previous-block"`, `rejected_draft_prob`): at
inference a block starts where the previous block's draft was just rejected.

One step on one utterance costs one teacher pass (no grad; its self-attention keys/values
are the prefix of every cut, and its cross-attention keys/values are shared by all rows) and
one student pass over `cuts` blocks of γ+1 tokens. Encoder outputs and transcripts are
computed once (`prepare_examples`) and cached on disk: this is what makes CPU training practical.

    config.py  `TrainingConfig`, the recipes' draft options (`add_draft_arguments`, `draft_options`)
    data.py    `Example`, `prepare_examples` (Whisper), `prepare_lm_examples` (text LMs),
               `ReplayBuffer` and the previous-block drafts
    tasks.py   `DistillationTask`: a model's teacher pass, student block forward, evaluation
               (`evaluate`: tokens per forward of lossless decoding) and export; `WhisperTask`
               (encoder-decoder, audio), `LMTask` (decoder-only text), `as_task`
    loop.py    `distillation_step` (the weighted loss), `train` (checkpoints, resumption,
               warm start from a saved adapter of a lower rank)
    distributed.py  `Processes`: data-parallel training under `accelerate launch` (gradients
               averaged over the processes, per-rank draws; accelerate imported only then)

The loop is model-agnostic: a model enters through its `DistillationTask`.
"""

from .config import DRAFT_FIELDS, TrainingConfig, add_draft_arguments, config_from_arguments, draft_options
from .data import Example, ReplayBuffer, prepare_examples, prepare_lm_examples
from .distributed import Processes
from .loop import distillation_step, reused_slots, suffix_weights, train
from .tasks import DistillationTask, LMTask, WhisperTask, as_task

__all__ = [
    "config_from_arguments",
    "DRAFT_FIELDS", "DistillationTask", "Example", "LMTask", "Processes", "ReplayBuffer", "TrainingConfig", "WhisperTask",
    "add_draft_arguments", "as_task", "distillation_step", "draft_options", "prepare_examples",
    "prepare_lm_examples", "reused_slots", "suffix_weights", "train",
]
