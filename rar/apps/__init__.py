"""The top layer: what people run. `cli` (the `rar` command) and the web `app`, the demo, the
file front-ends of sampling, editing, evaluation and scoring, the ablation runner and the digit
studies, and `hub` (`rar.from_pretrained`). Nothing below imports from here."""
