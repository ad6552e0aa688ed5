"""The web app (`covidxr serve`, `python app.py`): the serving stage, a room per view.

- `server.py`: the command line and `launch`: models loaded and checked, middleware, the server.
- `layout.py`: the page's components and which handler each event runs; no logic.
- `handlers.py`: what Gradio calls, a line each: a view run as a job (it runs a model) or
  directly (it runs none), and the checks run before a request may join the queue.
- `state.py`: `XrayApp`, what the views share: the models, each session's kept maps, the
  examples, the job runner and the places per client.
- The views, plain functions of an `XrayApp` and a request's values, returning what the page shows:
  - `analysis.py`: one model or every model (compare) on one file; re-blending; `/predict`.
  - `map_test.py`: the lungs, or all but them, blanked; `/occlusion`.
  - `eraser.py`: what the person painted, blanked.
  - `deletion.py`: the deletion curve; `/deletion_curve`.
  - `model_card.py`: the model's card, the About panel, MODEL_CARD.md.
- `words.py`: the page's own words, styles and scripts.
- `jobs.py`: analyses one at a time, stoppable by a cancel; places per client in the queue.
- `middleware.py`, `logins.py`: bounded bodies, security headers, known API names; logins.
- `sessions.py`: what the page keeps of each session's analyses.
- `gradio_fixes.py`: the three patches to Gradio components, each with the bug it works around.
"""
