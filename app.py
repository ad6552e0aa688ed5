"""The covidxr web app: `python app.py` is `covidxr serve` (see covidxr/serve.py).

    python app.py                      # http://127.0.0.1:7860
    python app.py --port 8080 --checkpoint runs/x/model.safetensors
"""

from covidxr.serve import main

if __name__ == "__main__":
    main()
