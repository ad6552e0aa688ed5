"""The covidxr web app: `python app.py` is `covidxr serve` (see covidxr/app/).

    python app.py                      # http://127.0.0.1:7860
    python app.py --port 8080 --checkpoint runs/x/model.safetensors
    python app.py --host 0.0.0.0 --auth-file logins.txt --public-url https://xray.example.org

The options are covidxr.app.server.main's (`python app.py --help`).
"""

from covidxr.app.server import main

if __name__ == "__main__":
    main()
