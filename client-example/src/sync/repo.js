// repo mode — an unmodified automerge-repo client syncing through the relay
// (which speaks the automerge-repo protocol at ws://relay/).
import { Repo } from "@automerge/automerge-repo/slim"
import { WebSocketClientAdapter } from "@automerge/automerge-repo-network-websocket"
import { Automerge } from "../automerge.js"

export function repoSync({ docId, relay, getDoc, receive, setStatus }) {
  // No storage adapter: the app keeps its own local copy (src/local.js).
  const repo = new Repo({ network: [] })
  // Hand the repo our local copy under the list's id; it becomes "ready" at
  // once, so this works offline and for lists the relay has never seen.
  const handle = repo.import(Automerge.save(getDoc()), { docId })

  let adapter = null
  let relayPeer = null // the relay's peer id while connected
  let relayHeads = null // the heads the relay told us it has

  const sameHeads = (a, b) => a?.length === b?.length && a.every((h) => b.includes(h))
  const showStatus = () =>
    setStatus(!relayPeer ? "offline" : sameHeads(relayHeads, Automerge.getHeads(handle.doc())) ? "online" : "syncing")

  handle.on("heads-changed", ({ doc }) => { receive(doc); showStatus() })
  repo.networkSubsystem.on("peer", ({ peerId }) => { relayPeer = peerId; showStatus() })
  repo.networkSubsystem.on("peer-disconnected", () => { relayPeer = null; showStatus() })
  repo.synchronizer.on("sync-state", ({ documentId, syncState }) => {
    if (documentId === handle.documentId) { relayHeads = syncState.theirHeads; showStatus() }
  })

  function connect() {
    if (adapter || !navigator.onLine) return
    adapter = new WebSocketClientAdapter(relay.replace(/^http/, "ws"), 1000) // retry every second
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

  return {
    // Our change was made on the app's copy; fold it into the repo's copy.
    changed() { handle.update((doc) => Automerge.merge(doc, getDoc())) },
    stop() {
      window.removeEventListener("online", connect)
      window.removeEventListener("offline", disconnect)
      disconnect()
      repo.shutdown()
    },
  }
}
