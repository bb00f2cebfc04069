"""Trainers of machine volunteers (the optional `train` extra: torch and torchvision).

`app.train.common` holds what every trainer needs (device, images by subject id, seeding, posting
predictions); `app.train.detector` is the Faster R-CNN clump detector behind `gzx train` and
`gzx predict`. Nothing here is imported by the base package: torch is imported inside functions,
so `import app` works without the extra.
"""
