// http mode — the Automerge tutorial's flow, pointed at the relay:
// load and merge on start, POST the whole document after every change.
// The relay merges each upload instead of overwriting it. Other people's
// edits arrive when the page loads again (or when we come back online).
import { Automerge } from "../automerge.js"

export function httpSync({ docId, relay, getDoc, receive, setStatus }) {
  const url = `${relay}/${docId}`
  let loaded = false // fetched the relay's copy since we (re)connected?
  let dirty = true // local changes the relay may not have?
  let running = false
  let stopped = false
  let retryTimer

  async function run() {
    if (running || stopped) return
    running = true
    clearTimeout(retryTimer)
    setStatus("syncing")
    try {
      if (!loaded) {
        const res = await fetch(url, { cache: "no-store" })
        if (res.ok) receive(Automerge.load(new Uint8Array(await res.arrayBuffer())))
        else if (res.status !== 404) throw new Error(`GET ${res.status}`)
        loaded = true
      }
      while (dirty && !stopped) {
        dirty = false
        const res = await fetch(url, {
          method: "POST",
          body: Automerge.save(getDoc()),
          headers: { "Content-Type": "application/octet-stream" },
        })
        if (!res.ok) { dirty = true; throw new Error(`POST ${res.status}`) }
      }
      setStatus("online")
    } catch (err) {
      // Offline or relay down: keep the local copy, try again soon.
      loaded = false
      setStatus("offline", err.message)
      if (!stopped) retryTimer = setTimeout(run, 3000)
    } finally {
      running = false
    }
  }

  const onOnline = () => run()
  const onOffline = () => setStatus("offline", "the browser is offline")
  window.addEventListener("online", onOnline)
  window.addEventListener("offline", onOffline)
  run()

  return {
    changed() { dirty = true; run() },
    stop() {
      stopped = true
      clearTimeout(retryTimer)
      window.removeEventListener("online", onOnline)
      window.removeEventListener("offline", onOffline)
    },
  }
}
