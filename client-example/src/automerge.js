// Load Automerge's WebAssembly core by URL and re-export the API.
//
// "@automerge/automerge/slim" is the entry point without bundler magic: it
// exports the API and waits for initializeWasm(). The `?url` suffix asks Vite
// for the URL of the .wasm file (served in dev, copied into dist/ on build).
// automerge-repo's "/slim" entry uses the same module, so one call is enough.
import * as Automerge from "@automerge/automerge/slim"
import wasmUrl from "@automerge/automerge/automerge.wasm?url"

await Automerge.initializeWasm(wasmUrl)

export { Automerge }
