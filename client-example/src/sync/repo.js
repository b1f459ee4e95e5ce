// repo mode — an unmodified automerge-repo client syncing through the relay
// (which speaks the automerge-repo protocol at ws://relay/). With a token, the
// adapter's URL carries it: ws://relay/?token=...
import { Repo } from "@automerge/automerge-repo/slim"
import { WebSocketClientAdapter } from "@automerge/automerge-repo-network-websocket"
import { Automerge } from "../automerge.js"
import { accessProblem, withToken } from "./token.js"

export function repoSync({ docId, relay, token, getDoc, receive, setStatus }) {
  // No storage adapter: the app keeps its own local copy (src/local.js).
  const repo = new Repo({ network: [] })
  // Hand the repo our local copy under the list's id; it becomes "ready" at
  // once, so this works offline and for lists the relay has never seen.
  const handle = repo.import(Automerge.save(getDoc()), { docId })

  let adapter = null
  let relayPeer = null // the relay's peer id while connected
  let relayHeads = null // the heads the relay told us it has
  let denied = null // why the relay refuses this token, while it does
  let checkTimer
  let stopped = false

  const sameHeads = (a, b) => a?.length === b?.length && a.every((h) => b.includes(h))
  const showStatus = () =>
    denied
      ? setStatus("denied", denied)
      : setStatus(!relayPeer ? "offline" : sameHeads(relayHeads, Automerge.getHeads(handle.doc())) ? "online" : "syncing")

  // A refused upgrade is just a failed connection to the page, and the adapter
  // would retry it every second. Ask over HTTP whether the token is the
  // reason; while it is, stay disconnected and ask again every few seconds.
  async function checkAccess() {
    clearTimeout(checkTimer)
    const problem = await accessProblem(relay, docId, token)
    if (stopped) return
    denied = problem
    if (denied) {
      disconnect()
      checkTimer = setTimeout(checkAccess, 5000)
    } else {
      connect()
    }
    showStatus()
  }

  handle.on("heads-changed", ({ doc }) => { receive(doc); showStatus() })
  repo.networkSubsystem.on("peer", ({ peerId }) => { relayPeer = peerId; showStatus() })
  repo.networkSubsystem.on("peer-disconnected", () => {
    relayPeer = null
    showStatus()
    if (adapter) checkAccess() // an expired token closes the socket (4401)
  })
  repo.synchronizer.on("sync-state", ({ documentId, syncState }) => {
    if (documentId === handle.documentId) { relayHeads = syncState.theirHeads; showStatus() }
  })

  function connect() {
    if (adapter || !navigator.onLine) return
    adapter = new WebSocketClientAdapter(withToken(relay.replace(/^http/, "ws"), token), 1000) // retry every second
    repo.networkSubsystem.addNetworkAdapter(adapter)
  }
  function disconnect() {
    if (adapter) repo.networkSubsystem.removeNetworkAdapter(adapter)
    adapter = null
    relayPeer = null
    showStatus()
  }
  window.addEventListener("online", connect)
  window.addEventListener("offline", disconnect)
  connect()
  showStatus()
  checkAccess()

  return {
    // Our change was made on the app's copy; fold it into the repo's copy.
    changed() { handle.update((doc) => Automerge.merge(doc, getDoc())) },
    stop() {
      stopped = true
      clearTimeout(checkTimer)
      window.removeEventListener("online", connect)
      window.removeEventListener("offline", disconnect)
      disconnect()
      repo.shutdown()
    },
  }
}
