"""HellaSwag's document processing for the harness, written after lm-evaluation-harness's
tasks/hellaswag/utils.py (not imported from shortgpt_deploy.tasks, so the harness's side stays independent of ours)."""

import re


def preprocess(text):
    text = text.strip()
    text = text.replace(" [title]", ". ")  # WikiHow rows carry bracketed markup
    text = re.sub("\\[.*?\\]", "", text)
    return text.replace("  ", " ")


def hellaswag_docs(dataset):
    def one(doc):
        ctx = doc["ctx_a"] + " " + doc["ctx_b"].capitalize()
        return {
            "query": preprocess(doc["activity_label"] + ": " + ctx),
            "choices": [preprocess(ending) for ending in doc["endings"]],
            "gold": int(doc["label"]),
        }

    return dataset.map(one)
