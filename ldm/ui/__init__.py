"""`ldm ui`: a local web page over the library: generate (text to image, img2img, inpainting), look inside the
sampler, follow training runs, diagnose.

server.py (Flask routes and the page) calls plain functions that tests call directly: generate.py (the form,
validated, run through ldm generate's own code path), uploads.py (the image to edit and the painted mask),
inside.py (a trace, per step), runs.py (what a training run folder holds), diagnose.py; models.py loads each model
folder once; jobs.py runs long work in threads with progress and cancellation.
"""
