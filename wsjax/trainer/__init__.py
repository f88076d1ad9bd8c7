"""The Trainer: one run of a config into a model_dir (train, evaluate, validate, compile).

options       RunOptions: every run flag, declared once (the CLI is derived from it)
trainer       Trainer and run(): the loop, the modes, the session around them
hooks         Callback and the built-in hooks (log, progress, TensorBoard, checkpoint,
              eval, profile, preemption, non-finite steps)
setup         RunSpec, RunResult; the plan, compiling, the estimate, the engine's start
steps         how far training goes: max_steps, or runconfig.num_epochs of the data
evaluation    eval passes, eval / eval_all, --eval_text
faults        the non-finite policy and the preemption guard
metrics       MFU, performance.json, TensorBoard, log lines, the progress bar
run_dir       the model_dir: its layout, its lock, the compile cache
tokenizer     the run's tokenizer, saved beside its checkpoints
eval_text     a text or jsonl file tokenised for evaluation (bits per byte)
"""

from wsjax.trainer.hooks import Callback, StepInfo
from wsjax.trainer.options import MODES, RunOptions
from wsjax.trainer.setup import RunResult
from wsjax.trainer.trainer import Trainer, run

__all__ = ["MODES", "Callback", "RunOptions", "RunResult", "StepInfo", "Trainer", "run"]
