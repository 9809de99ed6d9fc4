"""Every size bound of the library in one place, so that hostile graders and samples cost bounded time and
memory: validation refuses a grader past these, running records an error for a sample past them."""

# Graders.
MAX_NAME_CHARS = 256
MAX_MODEL_CHARS = 256
MAX_MULTI_NESTING = 3  # a multi inside a multi inside a multi, no deeper
MAX_SUB_GRADERS = 16  # per multi
MAX_GRADERS = 64  # in the whole tree, so at most this many model calls per sample
MAX_SUB_GRADER_KEY_CHARS = 64
MAX_INPUT_MESSAGES = 32  # score_model / label_model `input`
MAX_CONTENT_PARTS = 32  # per message
MAX_LABELS = 64
MAX_LABEL_CHARS = 256
MAX_COMPLETION_TOKENS = 32_768  # sampling_params.max_completions_tokens

# Templates.
MAX_TEMPLATE_CHARS = 50_000
MAX_PLACEHOLDERS = 100  # per template
MAX_VARIABLE_SEGMENTS = 16  # `item.a.b.c`: the parts after the namespace
MAX_SEGMENT_CHARS = 128

# Formulas.
MAX_FORMULA_CHARS = 1_000
MAX_FORMULA_DEPTH = 64  # nesting of the parsed expression (and of its parentheses)

# Samples and rendered text.
MAX_SAMPLE_CHARS = 1_000_000  # `model_sample` of a run request
MAX_RENDERED_CHARS = 2_000_000  # one rendered template
# fuzzy_match (rapidfuzz's WRatio) grows with the cube of the shorter text when the lengths differ by 1.5x
# or more: at 3,000 characters the worst pair takes about half a second (4,000: over one).
MAX_FUZZY_CHARS = 3_000
# The token metrics (bleu, gleu, rouge_*) compare texts of at most this many words each: rouge_l's longest
# common subsequence grows with the product of the lengths (20,000 x 20,000 words: about 0.3 s).
MAX_SIMILARITY_TOKENS = 20_000
# A score or label answer longer than this is not parsed (model_grader_parse_error).
MAX_ANSWER_CHARS = 100_000
# How many `{` a score or label answer is searched from for a JSON object (each try is linear).
MAX_JSON_STARTS = 32
