import { defineConfig } from "vite"

// Nothing special is needed for Automerge: src/automerge.js uses the "slim"
// entry point and hands it the URL of the .wasm file, which Vite serves in dev
// and copies into dist/assets/ on build.
export default defineConfig({
  server: { port: 5173 },
  build: { target: "es2022" },
})
