// The local copy: every list is kept in localStorage as Automerge.save() bytes
// (base64), so the app works offline and survives reloads. Settings too.
import { Automerge } from "./automerge.js"

const docKey = (id) => `automerge-todos:doc:${id}`

export function loadLocal(id) {
  const stored = localStorage.getItem(docKey(id))
  return stored ? Automerge.load(fromBase64(stored)) : null
}

export function saveLocal(id, doc) {
  localStorage.setItem(docKey(id), toBase64(Automerge.save(doc)))
}

export const getSetting = (name, fallback) => localStorage.getItem(`automerge-todos:${name}`) ?? fallback
export const setSetting = (name, value) => localStorage.setItem(`automerge-todos:${name}`, value)

function toBase64(bytes) {
  let s = ""
  for (let i = 0; i < bytes.length; i += 0x8000) s += String.fromCharCode(...bytes.subarray(i, i + 0x8000))
  return btoa(s)
}

function fromBase64(text) {
  return Uint8Array.from(atob(text), (c) => c.charCodeAt(0))
}
