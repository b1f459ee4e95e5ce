// http mode — the Automerge tutorial's flow, pointed at the relay:
// load and merge on start, POST the whole document after every change.
// The relay merges each upload instead of overwriting it. Other people's
// edits arrive when the page loads again (or when we come back online).
// With a token, every request carries `Authorization: Bearer <token>`.
import { Automerge } from "../automerge.js"
import { authHeaders } from "./token.js"

export function httpSync({ docId, relay, token, getDoc, receive, setStatus }) {
  const url = `${relay}/${docId}`
  let loaded = false // fetched the relay's copy since we (re)connected?
  let dirty = true // local changes the relay may not have?
  let readOnly = false // the token may read this list but not change it
  let running = false
  let stopped = false
  let retryTimer

  // 401/403: retrying with the same token will not help; wait for a new token
  // (which restarts the sync) or the next local change.
  class Refused extends Error {}
  const refused = (res, what) => {
    if (res.status === 401) return new Refused(token ? "The relay does not accept this token" : "The relay needs a token")
    if (res.status === 403) return new Refused(`This token may not ${what} this list`)
    return null
  }

  async function run() {
    if (running || stopped) return
    running = true
    clearTimeout(retryTimer)
    setStatus("syncing")
    try {
      if (!loaded) {
        const res = await fetch(url, { cache: "no-store", headers: authHeaders(token) })
        if (res.ok) receive(Automerge.load(new Uint8Array(await res.arrayBuffer())))
        else if (res.status !== 404) throw refused(res, "read") ?? new Error(`GET ${res.status}`)
        loaded = true
      }
      while (dirty && !stopped && !readOnly) {
        dirty = false
        const res = await fetch(url, {
          method: "POST",
          body: Automerge.save(getDoc()),
          headers: { "Content-Type": "application/octet-stream", ...authHeaders(token) },
        })
        if (res.status === 403) readOnly = true
        else if (!res.ok) { dirty = true; throw refused(res, "change") ?? new Error(`POST ${res.status}`) }
      }
      if (readOnly) setStatus("readonly", "This token may read this list but not change it: your edits stay in this browser")
      else setStatus("online")
    } catch (err) {
      if (err instanceof Refused) {
        loaded = false
        setStatus("denied", err.message)
        return
      }
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
    changed() { dirty = true; if (!readOnly) run() },
    stop() {
      stopped = true
      clearTimeout(retryTimer)
      window.removeEventListener("online", onOnline)
      window.removeEventListener("offline", onOffline)
    },
  }
}
