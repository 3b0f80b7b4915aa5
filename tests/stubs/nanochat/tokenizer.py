"""Stand-in for nanochat's tokenizer: bytes plus one <|bos|> special token."""


class ByteTokenizer:
    bos_id = 256

    def get_bos_token_id(self):
        return self.bos_id

    def get_vocab_size(self):
        return 257

    def encode(self, text, prepend=None, append=None):
        if isinstance(text, list):
            return [self.encode(t, prepend, append) for t in text]
        ids = list(text.encode("utf-8"))
        return ([prepend] if prepend is not None else []) + ids + ([append] if append is not None else [])

    def decode(self, ids):
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


def get_tokenizer():
    return ByteTokenizer()
