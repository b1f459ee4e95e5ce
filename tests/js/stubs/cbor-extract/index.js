// cbor-x treats a failing require of its optional native extractor as "not available".
throw new Error("cbor-extract is stubbed out: cbor-x uses its pure-JS decoder")
