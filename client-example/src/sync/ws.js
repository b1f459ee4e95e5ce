// ws mode — the relay's per-document WebSocket, ws://relay/{id}.
// The relay first sends the whole document, then every new batch of changes
// as binary messages (apply with loadIncremental). We send our changes as
// binary messages; each is acknowledged with {"type":"ack","heads":[...]}.
// With a token, the URL carries `?token=` (browsers cannot set headers on a
// WebSocket); a token that expires mid-session closes the socket with 4401.
import { Automerge } from "../automerge.js"
import { accessProblem, withToken } from "./token.js"

export function wsSync({ docId, relay, token, getDoc, receive, setStatus }) {
  const url = withToken(`${relay.replace(/^http/, "ws")}/${docId}`, token)
  let socket = null
  let unacked = 0 // messages sent but not yet durable on the relay
  let retryDelay = 500
  let retryTimer
  let stopped = false
  let denied = null // why the relay refuses this token, while it does
  let readOnly = false // the relay refused an upload as forbidden

  const showStatus = () => {
    if (denied) return setStatus("denied", denied)
    if (socket?.readyState !== WebSocket.OPEN) return setStatus("offline")
    if (readOnly) return setStatus("readonly", "This token may read this list but not change it: your edits stay in this browser")
    setStatus(unacked > 0 ? "syncing" : "online")
  }

  function send(bytes) {
    if (socket?.readyState !== WebSocket.OPEN || bytes.length === 0 || readOnly) return
    unacked++
    socket.send(bytes)
    showStatus()
  }

  function connect() {
    clearTimeout(retryTimer)
    if (stopped || socket || !navigator.onLine) return showStatus()
    setStatus("syncing")
    const ws = (socket = new WebSocket(url))
    ws.binaryType = "arraybuffer"
    // On every (re)connect send everything we have: the relay merges it, and
    // whatever we changed while offline gets there.
    let opened = false
    ws.onopen = () => { opened = true; denied = null; retryDelay = 500; send(Automerge.save(getDoc())) }
    ws.onmessage = ({ data }) => {
      if (typeof data !== "string") return receive(new Uint8Array(data))
      const msg = JSON.parse(data)
      if (msg.type === "ack" || msg.type === "error") unacked = Math.max(0, unacked - 1)
      if (msg.type === "error" && msg.error === "forbidden") readOnly = true
      else if (msg.type === "error") console.warn("relay rejected an upload:", msg)
      if (msg.type === "deleted") stopped = true
      showStatus()
    }
    ws.onclose = async ({ code }) => {
      if (socket !== ws) return
      socket = null
      unacked = 0
      // Refused before the upgrade (never opened), or the token expired (4401):
      // say so instead of "offline", and keep retrying slowly.
      if (code === 4401) denied = "The token has expired"
      else if (!opened) {
        denied = await accessProblem(relay, docId, token)
        if (stopped) return // the list or the settings changed meanwhile
      }
      if (denied) retryDelay = 5000
      showStatus()
      if (!stopped) retryTimer = setTimeout(connect, retryDelay)
      retryDelay = Math.min(retryDelay * 2, 5000)
    }
  }

  // The browser knows when the network is gone: drop the socket at once
  // instead of waiting for it to time out, and reconnect when it is back.
  function disconnect() {
    const ws = socket
    socket = null
    unacked = 0
    ws?.close()
    showStatus()
  }
  const onOnline = () => connect()
  window.addEventListener("online", onOnline)
  window.addEventListener("offline", disconnect)
  connect()

  return {
    // Send only what changed since `headsBefore`; a full save follows on reconnect.
    changed(headsBefore) { send(Automerge.saveSince(getDoc(), headsBefore)) },
    stop() {
      stopped = true
      clearTimeout(retryTimer)
      window.removeEventListener("online", onOnline)
      window.removeEventListener("offline", disconnect)
      disconnect()
    },
  }
}
