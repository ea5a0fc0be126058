"""Serve a model over the OpenAI API: the same as `python -m jpaged.serve`
(see jpaged/serve.py and README, "Serve"; `--help` lists every flag).

  python scripts/serve.py --model smollm2-135m --port 8000
"""
from jpaged.serve import main

if __name__ == "__main__":
    main()
