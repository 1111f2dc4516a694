"""The bottom layer, imported by every other: files and weight folders (`files`), seeds, devices,
run configs (`runconfig`), every shared input check (`checks`), weight names (`names`) and the
learning-rate schedule (`schedules`). It imports nothing else of rar."""
