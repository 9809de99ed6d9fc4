"""`svfit classify MODEL TEXT [--text-pair TEXT]`: a classification fine-tune's labels for one text, or for a
text pair (paraphrase, entailment: a model trained on `{"text", "text_pair", "label"}` lines), through
`/v1/classifications`. Prints every label with its probability, most likely first; `--json` the whole answer.
"""

from __future__ import annotations

import argparse

from svfit_cli.client.base import EXIT_OK, client_command, print_json
from svfit_cli.client.http import ApiClient
from svfit_cli.client.output import table

# The first request for a fine-tune loads it on a serving replica before it answers.
CLASSIFY_TIMEOUT_S = 300.0


def classification_body(model: str, text: str, text_pair: str | None) -> dict:
    """The request: the text as a string, or the pair as the object the endpoint takes for one."""
    return {"model": model, "input": text if text_pair is None else {"text": text, "text_pair": text_pair}}


@client_command
def cmd_classify(client: ApiClient, args: argparse.Namespace) -> int:
    answer = client.post("classifications", classification_body(args.model, args.text, args.text_pair),
                         timeout=CLASSIFY_TIMEOUT_S)
    if args.json_output:
        print_json(answer)
        return EXIT_OK
    labels = answer["data"][0]["labels"]
    table(["label", "probability"], [(entry["label"], f"{entry['probability']:.4f}") for entry in labels])
    return EXIT_OK


def add_commands(commands: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    classify = commands.add_parser("classify", parents=[common], help="a classifier's labels for a text (client)")
    classify.add_argument("model", help="a classification fine-tune id (see GET /v1/models)")
    classify.add_argument("text", help="the text to classify (the first text of a pair with --text-pair)")
    classify.add_argument("--text-pair", dest="text_pair",
                          help="the pair's second text, for a model trained on text pairs")
    classify.set_defaults(func=cmd_classify)
