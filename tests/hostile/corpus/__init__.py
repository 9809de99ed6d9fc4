"""The hostile upload corpus: bad training data (`content`), bad requests and hostile filenames
(`requests`). Small bodies live as files under `files/`; big ones are generated (`generated`)."""
