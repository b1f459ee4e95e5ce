// cbor-x catches this and falls back to its pure-JS decoder.
throw new Error("cbor-extract is not installed (stub): cbor-x uses its pure-JS decoder")
