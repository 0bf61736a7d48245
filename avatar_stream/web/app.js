// avatar-stream browser client: WebRTC to the server, no framework, no build step.
//
// Signalling (see DESIGN.md): GET /v1/config for ICE servers, one non-trickle offer POSTed to
// /v1/sessions, DELETE /v1/sessions/{id} to hang up. Events and control travel on the
// "control" data channel. Tests and automation read `window.avatarClient`.
// Query options: ?autoconnect=1 connects on load, ?mic=1 starts with the mic on,
// ?avatar=ID picks an avatar (the gallery keeps it there). The gallery lists the server's
// avatars (/v1/avatars), ranks dropped or chosen photos (POST /v1/avatars/rank: the scores
// of `avatar-stream avatars rank`), uploads the one picked and deletes. A server started with --api-key needs the key: pass it in the
// fragment (#key=KEY: a fragment is never sent to the server or logged). The session token
// the server returns is used for this session's calls (DELETE, interrupt, say) and shown so
// a script can drive the session (examples/voice_assistant.py).
"use strict";

(() => {
  const $ = (id) => document.getElementById(id);
  const params = new URLSearchParams(location.search);

  // ---- state visible to tests ------------------------------------------------------------
  const client = {
    state: "idle", // idle | connecting | connected | disconnected | failed | closed
    sessionId: null,
    token: null, // this session's token: enough for its own calls, nothing else
    events: [], // every JSON message received on the data channel, in order
    errors: [], // client-side failures (signalling, decoding, permissions)
    framesReceived: 0, // video frames presented (requestVideoFrameCallback)
    lastStats: null, // the latest once-a-second summary of pc.getStats()
    audioEnergy: 0, // running sum of remote-audio RMS x seconds
    audioLevels: [], // remote-audio RMS, one value per 100 ms
    micOn: params.get("mic") === "1",
    avatar: params.get("avatar") || "default", // the avatar the next session animates
    avatars: [], // the server's avatars (GET /v1/avatars)
    ranking: null, // the last photos ranked: {ranking: [score, ...], recommended}
    connect,
    disconnect,
    interrupt,
    setMic,
    playFile,
    say,
    refreshAvatars,
    selectAvatar,
    rankPhotos,
    deleteAvatar,
  };
  window.avatarClient = client;

  const apiKey = new URLSearchParams(location.hash.slice(1)).get("key");
  const MAX_EVENTS = 1000;
  const MAX_LEVELS = 6000; // 10 minutes of 100 ms values
  const ICE_GATHER_TIMEOUT_MS = 5000;

  let pc = null;
  let dc = null;
  let audioSender = null;
  let micTrack = null; // the getUserMedia track while the mic is on
  let fileSource = null; // the AudioBufferSourceNode while a file is being spoken
  let fileBuffer = null; // the decoded file
  let statsTimer = null;
  let levelTimer = null;
  let prevStats = null;
  let remoteStream = null; // the avatar's video + audio
  let t0 = performance.now();

  // ---- one AudioContext for everything ----------------------------------------------------
  // `genDest` is a generated outgoing track: silence, plus the chosen file while it plays.
  // The audio sender carries either the mic track or this one.
  let ctx = null;
  let genDest = null;

  function audio() {
    if (!ctx) {
      ctx = new AudioContext();
      genDest = ctx.createMediaStreamDestination();
      // Chrome sends no packets at all for a destination with nothing connected; a constant 0
      // keeps the track producing real silence, as a muted microphone would.
      const zero = ctx.createConstantSource();
      zero.offset.value = 0;
      zero.connect(genDest);
      zero.start();
    }
    // Without a user gesture Chrome starts the context suspended; resume on the next click.
    if (ctx.state === "suspended") ctx.resume().catch(() => {});
    return ctx;
  }
  document.addEventListener("click", () => ctx && ctx.state === "suspended" && ctx.resume());

  // ---- event log -------------------------------------------------------------------------
  function log(text, cls = "") {
    const li = document.createElement("li");
    const t = document.createElement("span");
    t.className = "t";
    t.textContent = ((performance.now() - t0) / 1000).toFixed(2).padStart(7);
    li.append(t, document.createTextNode(text));
    if (cls) li.className = cls;
    const box = $("log");
    const atBottom = box.scrollTop + box.clientHeight >= box.scrollHeight - 4;
    box.append(li);
    while (box.childElementCount > 500) box.firstElementChild.remove();
    if (atBottom) box.scrollTop = box.scrollHeight;
  }

  function fail(message) {
    client.errors.push(message);
    log(message, "error");
  }

  function setState(s) {
    if (client.state === s) return;
    client.state = s;
    const pill = $("state");
    pill.textContent = s;
    pill.dataset.state = s;
    log(`state: ${s}`, "state");
    refreshButtons();
  }

  function refreshButtons() {
    const live = pc !== null;
    $("connect").disabled = live;
    $("disconnect").disabled = !live;
    $("interrupt").disabled = !live;
    $("play-file").disabled = !live || !fileBuffer;
    $("say-button").disabled = !live || !client.sessionId;
    $("mic").textContent = client.micOn ? "Mic on" : "Mic off";
    $("mic").setAttribute("aria-pressed", String(client.micOn));
  }

  // ---- credentials -----------------------------------------------------------------------
  // Server-wide calls carry the API key (if any); this session's calls carry its token.
  function keyHeaders(extra = {}) {
    return apiKey ? { ...extra, Authorization: `Bearer ${apiKey}` } : extra;
  }
  function sessionHeaders(extra = {}) {
    const credential = client.token || apiKey;
    return credential ? { ...extra, Authorization: `Bearer ${credential}` } : extra;
  }

  function showSession() {
    const box = $("session-info");
    if (!client.sessionId) {
      box.hidden = true;
      return;
    }
    $("session-id").textContent = client.sessionId;
    $("session-token").textContent = client.token || "(none)";
    $("session-cmd").textContent =
      `python examples/voice_assistant.py --server ${location.origin} ` +
      `--session=${client.sessionId}` + (client.token ? ` --token=${client.token}` : "");
    box.hidden = false;
  }

  // ---- connect / disconnect --------------------------------------------------------------
  async function iceServers() {
    try {
      const r = await fetch("/v1/config", { headers: keyHeaders() });
      if (!r.ok) throw new Error(`HTTP ${r.status}`);
      const cfg = await r.json();
      return Array.isArray(cfg.ice_servers) ? cfg.ice_servers : [];
    } catch (e) {
      log(`GET /v1/config failed (${e.message}); using no ICE servers`);
      return [];
    }
  }

  async function openMic() {
    if (micTrack && micTrack.readyState === "live") return micTrack;
    try {
      // Echo cancellation matters here: the avatar's voice comes out of the speakers and
      // would otherwise be sent straight back to it as new speech.
      const s = await navigator.mediaDevices.getUserMedia({
        audio: { echoCancellation: true, noiseSuppression: true, autoGainControl: true },
      });
      micTrack = s.getAudioTracks()[0];
      watchLevel(new MediaStream([micTrack]), "local");
      return micTrack;
    } catch (e) {
      fail(`microphone unavailable: ${e.name || e.message}`);
      return null;
    }
  }

  function closeMic() {
    if (micTrack) micTrack.stop(); // stop, so the browser's recording indicator goes off
    micTrack = null;
  }

  // What the audio sender should carry right now.
  function outgoingTrack() {
    if (fileSource) return genDest.stream.getAudioTracks()[0];
    if (client.micOn && micTrack) return micTrack;
    return genDest.stream.getAudioTracks()[0];
  }

  async function updateSender() {
    if (!audioSender) return;
    const track = outgoingTrack();
    if (audioSender.track === track) return;
    try {
      await audioSender.replaceTrack(track);
    } catch (e) {
      if (pc) fail(`replaceTrack: ${e.message}`); // harmless while hanging up
    }
  }

  function waitIceGathering(peer) {
    if (peer.iceGatheringState === "complete") return Promise.resolve();
    return new Promise((resolve) => {
      const done = () => {
        clearTimeout(timer);
        peer.removeEventListener("icegatheringstatechange", check);
        resolve();
      };
      const check = () => peer.iceGatheringState === "complete" && done();
      // Gathering against an unreachable STUN/TURN server can take long: send what we have.
      const timer = setTimeout(() => {
        log("ICE gathering still running; sending the candidates found so far");
        done();
      }, ICE_GATHER_TIMEOUT_MS);
      peer.addEventListener("icegatheringstatechange", check);
    });
  }

  let connecting = false; // guards against a second Connect while the first is in flight

  async function connect() {
    if (pc || connecting) return;
    connecting = true;
    t0 = performance.now();
    client.events = [];
    client.errors = [];
    client.sessionId = null;
    client.token = null;
    showSession();
    setState("connecting");
    audio();
    try {
      await negotiate();
      if (pc) statsTimer = setInterval(pollStats, 1000);
    } catch (e) {
      if (client.state === "closed") return; // Disconnect pressed mid-way: not a failure
      fail(e.message || String(e));
      endSession(); // the server may have created it before we failed
      teardown();
      setState("failed");
    } finally {
      connecting = false;
    }
  }

  async function negotiate() {
    const peer = new RTCPeerConnection({ iceServers: await iceServers() });
    pc = peer;
    refreshButtons();

    // The data channel must exist before the offer so that it is negotiated in it.
    dc = peer.createDataChannel("control", { ordered: true });
    dc.onopen = () => log("data channel open", "state");
    dc.onclose = () => log("data channel closed", "state");
    dc.onmessage = onControlMessage;

    if (client.micOn && !(await openMic())) {
      client.micOn = false; // permission refused: send silence instead
      refreshButtons();
    }
    audioSender = peer.addTransceiver(outgoingTrack(), {
      direction: "sendrecv",
      streams: [new MediaStream()],
    }).sender;
    peer.addTransceiver("video", { direction: "recvonly" });

    peer.ontrack = onTrack;
    peer.onconnectionstatechange = () => {
      if (pc !== peer) return;
      const s = peer.connectionState;
      if (s === "connected" || s === "disconnected") setState(s);
      else if (s === "failed") {
        // ICE gave up (or the server closed): free everything so Connect works again.
        endSession();
        teardown();
        setState("failed");
      } else log(`connection: ${s}`, "state");
    };
    peer.oniceconnectionstatechange = () => log(`ice: ${peer.iceConnectionState}`, "state");

    await peer.setLocalDescription(await peer.createOffer());
    await waitIceGathering(peer); // non-trickle: the offer carries all our candidates
    if (pc !== peer) return; // disconnected meanwhile
    const body = { type: "offer", sdp: peer.localDescription.sdp };
    if (client.avatar) body.avatar = client.avatar;
    const r = await fetch("/v1/sessions", {
      method: "POST",
      headers: keyHeaders({ "Content-Type": "application/json" }),
      body: JSON.stringify(body),
    });
    const reply = await r.json().catch(() => ({}));
    if (!r.ok) throw new Error(`POST /v1/sessions: HTTP ${r.status}: ${reply.error || "?"}`);
    if (pc !== peer) {
      // Disconnect was pressed while the POST was in flight: end the new session too.
      if (reply.session_id) {
        const headers = reply.token ? { Authorization: `Bearer ${reply.token}` } : keyHeaders();
        fetch(`/v1/sessions/${reply.session_id}`, { method: "DELETE", headers });
      }
      return;
    }
    client.sessionId = reply.session_id;
    client.token = reply.token || null;
    log(`session ${reply.session_id}`);
    showSession();
    refreshButtons();
    await peer.setRemoteDescription({ type: "answer", sdp: reply.sdp });
  }

  // Best-effort DELETE without waiting (failure paths and page unload).
  function endSession() {
    if (!client.sessionId) return;
    fetch(`/v1/sessions/${client.sessionId}`, {
      method: "DELETE",
      keepalive: true,
      headers: sessionHeaders(),
    }).catch(() => {});
    client.sessionId = null;
    client.token = null;
    showSession();
  }

  async function disconnect() {
    if (!pc) return;
    const id = client.sessionId;
    if (id) {
      try {
        const r = await fetch(`/v1/sessions/${id}`, { method: "DELETE", headers: sessionHeaders() });
        log(`DELETE session: HTTP ${r.status}`);
      } catch (e) {
        log(`DELETE session failed: ${e.message}`, "error");
      }
    }
    teardown();
    setState("closed");
  }

  function teardown() {
    $("turn").hidden = true;
    clearInterval(statsTimer);
    statsTimer = null;
    stopFile();
    if (pc) pc.close();
    pc = null;
    dc = null;
    audioSender = null;
    closeMic();
    prevStats = null;
    remoteStream = null;
    $("video").srcObject = null;
    $("placeholder").hidden = false;
    refreshButtons();
  }

  // Closing the tab: end the session server-side without waiting for ICE to time out.
  window.addEventListener("pagehide", () => {
    if (pc) endSession();
  });

  // ---- data channel ----------------------------------------------------------------------
  function onControlMessage(ev) {
    if (typeof ev.data !== "string") return; // binary (PCM) is client -> server only
    let msg;
    try {
      msg = JSON.parse(ev.data);
    } catch {
      log(`non-JSON message: ${ev.data.slice(0, 200)}`, "error");
      return;
    }
    client.events.push(msg);
    if (client.events.length > MAX_EVENTS) client.events.splice(0, client.events.length - MAX_EVENTS);
    if (msg.type === "stats") return; // shown in the stats table, too chatty for the log
    if (msg.type === "ready" || msg.type === "state.changed") {
      const turn = $("turn"); // the turn state beside the connection's
      turn.textContent = msg.state || "idle";
      turn.hidden = false;
    }
    const { type, ...rest } = msg;
    const extra = Object.keys(rest).length ? " " + JSON.stringify(rest) : "";
    log(`← ${type}${extra}`, type === "error" ? "error" : "in");
  }

  function send(msg) {
    if (dc && dc.readyState === "open") {
      dc.send(JSON.stringify(msg));
      log(`→ ${msg.type}`);
      return true;
    }
    return false;
  }

  async function interrupt() {
    stopFile(); // otherwise the file keeps feeding the avatar new speech
    if (send({ type: "interrupt" })) return;
    if (!client.sessionId) return;
    // Data channel not open (yet): the HTTP route does the same.
    try {
      const r = await fetch(`/v1/sessions/${client.sessionId}/interrupt`, {
        method: "POST",
        headers: sessionHeaders(),
      });
      log(`POST interrupt: HTTP ${r.status}`);
    } catch (e) {
      fail(`POST interrupt: ${e.message}`);
    }
  }

  // ---- say: text through the server's TTS -----------------------------------------------
  // Returns the server's reply ({utterance_id, queued_s, ...}) or null on failure.
  async function say(text) {
    text = (text || "").trim();
    if (!text || !client.sessionId) return null;
    const button = $("say-button");
    button.disabled = true;
    log(`→ say "${text.length > 60 ? text.slice(0, 57) + "…" : text}"`);
    try {
      const r = await fetch(`/v1/sessions/${client.sessionId}/say`, {
        method: "POST",
        headers: sessionHeaders({ "Content-Type": "application/json" }),
        body: JSON.stringify({ text }),
      });
      const reply = await r.json().catch(() => ({}));
      if (!r.ok) {
        fail(`say: HTTP ${r.status}: ${reply.error || "?"}`);
        return null;
      }
      log(`say queued ${reply.queued_s} s as ${reply.utterance_id} (${reply.tts})`);
      return reply;
    } catch (e) {
      fail(`say: ${e.message}`);
      return null;
    } finally {
      refreshButtons();
    }
  }

  $("say-form").onsubmit = async (ev) => {
    ev.preventDefault();
    if (await say($("say-text").value)) $("say-text").value = "";
  };

  // ---- remote media ----------------------------------------------------------------------
  function onTrack(ev) {
    const video = $("video");
    // Both tracks should arrive in one stream (so the browser lip-syncs them); if the server
    // sent no stream id, group them ourselves.
    if (ev.streams && ev.streams[0]) remoteStream = ev.streams[0];
    else {
      if (!remoteStream) remoteStream = new MediaStream();
      remoteStream.addTrack(ev.track);
    }
    if (video.srcObject !== remoteStream) video.srcObject = remoteStream;
    log(`track: ${ev.track.kind}`, "state");
    if (ev.track.kind === "audio") watchLevel(new MediaStream([ev.track]), "remote");
    if (ev.track.kind === "video") $("placeholder").hidden = true;
    video.play().catch(() => {
      // Autoplay with sound needs a user gesture in normal browsers.
      $("unblock").hidden = false;
    });
  }

  $("unblock").onclick = () => {
    $("unblock").hidden = true;
    $("video").play().catch((e) => fail(`video.play(): ${e.message}`));
  };

  // Count presented video frames: the most direct measure of what the user sees.
  function countFrames() {
    const video = $("video");
    if (!("requestVideoFrameCallback" in video)) return;
    const onFrame = () => {
      client.framesReceived++;
      video.requestVideoFrameCallback(onFrame);
    };
    video.requestVideoFrameCallback(onFrame);
  }
  countFrames();

  // Audio level of a stream via an AnalyserNode. The analyser is not connected to the
  // speakers: the remote audio is already played by the <video> element (Chrome only feeds
  // WebAudio from a remote WebRTC track while a media element plays it, which it does).
  const analysers = { local: null, remote: null, file: null };

  function watchLevel(stream, which) {
    const ac = audio();
    if (analysers[which]) analysers[which].src.disconnect();
    const src = ac.createMediaStreamSource(stream);
    const node = ac.createAnalyser();
    node.fftSize = 2048;
    src.connect(node);
    analysers[which] = { src, node, buf: new Float32Array(node.fftSize) };
    if (!levelTimer) levelTimer = setInterval(sampleLevels, 100);
  }

  function rms(a) {
    if (!a) return 0;
    a.node.getFloatTimeDomainData(a.buf);
    let s = 0;
    for (const x of a.buf) s += x * x;
    return Math.sqrt(s / a.buf.length);
  }

  let lastLevelAt = 0;
  function sampleLevels() {
    const now = performance.now();
    const dt = lastLevelAt ? Math.min((now - lastLevelAt) / 1000, 1) : 0.1;
    lastLevelAt = now;
    const remote = pc ? rms(analysers.remote) : 0;
    // The "sent" meter follows whatever the sender carries: the mic or the file.
    const local = fileSource ? rms(analysers.file) : micTrack ? rms(analysers.local) : 0;
    client.audioEnergy += remote * dt;
    client.audioLevels.push(remote);
    if (client.audioLevels.length > MAX_LEVELS) client.audioLevels.splice(0, 1000);
    $("remote-level").value = remote;
    $("local-level").value = local;
  }

  // ---- stats -----------------------------------------------------------------------------
  const fmt = (v, digits = 0, unit = "") => (v == null || Number.isNaN(v) ? "–" : v.toFixed(digits) + unit);

  async function pollStats() {
    if (!pc) return;
    const report = await pc.getStats();
    const cur = { t: performance.now(), frames: client.framesReceived };
    let pair = null;
    let selectedPairId = null;
    report.forEach((s) => {
      if (s.type === "inbound-rtp" && s.kind === "video") cur.video = s;
      else if (s.type === "inbound-rtp" && s.kind === "audio") cur.audio = s;
      else if (s.type === "outbound-rtp" && s.kind === "audio") cur.sent = s;
      else if (s.type === "transport" && s.selectedCandidatePairId) selectedPairId = s.selectedCandidatePairId;
    });
    if (selectedPairId) pair = report.get(selectedPairId);
    if (!pair) report.forEach((s) => { if (s.type === "candidate-pair" && s.nominated && s.state === "succeeded") pair = s; });

    const prev = prevStats;
    const dt = prev ? (cur.t - prev.t) / 1000 : 0;
    const delta = (a, b, key) => (a && b && a[key] != null && b[key] != null ? a[key] - b[key] : null);

    // Jitter-buffer delay over the last second (falls back to the all-time average).
    const jbMs = (now, before) => {
      if (!now || !now.jitterBufferEmittedCount) return null;
      const dCount = delta(now, before, "jitterBufferEmittedCount");
      if (dCount > 0) return (1000 * delta(now, before, "jitterBufferDelay")) / dCount;
      return (1000 * now.jitterBufferDelay) / now.jitterBufferEmittedCount;
    };

    const v = cur.video;
    const st = {
      videoFps:
        v && v.framesPerSecond != null
          ? v.framesPerSecond
          : dt > 0 && delta(v, prev && prev.video, "framesDecoded") != null
            ? delta(v, prev.video, "framesDecoded") / dt
            : null,
      renderedFps: dt > 0 ? (cur.frames - prev.frames) / dt : null,
      videoKbps: dt > 0 && delta(v, prev && prev.video, "bytesReceived") != null
        ? (8 * delta(v, prev.video, "bytesReceived")) / dt / 1000
        : null,
      audioKbps: dt > 0 && delta(cur.audio, prev && prev.audio, "bytesReceived") != null
        ? (8 * delta(cur.audio, prev.audio, "bytesReceived")) / dt / 1000
        : null,
      sentAudioKbps: dt > 0 && delta(cur.sent, prev && prev.sent, "bytesSent") != null
        ? (8 * delta(cur.sent, prev.sent, "bytesSent")) / dt / 1000
        : null,
      videoJitterBufferMs: jbMs(v, prev && prev.video),
      audioJitterBufferMs: jbMs(cur.audio, prev && prev.audio),
      rttMs: pair && pair.currentRoundTripTime != null ? pair.currentRoundTripTime * 1000 : null,
      framesDecoded: v ? v.framesDecoded : null,
      framesDropped: v ? (v.framesDropped ?? 0) : null,
      packetsLost: (v ? v.packetsLost || 0 : 0) + (cur.audio ? cur.audio.packetsLost || 0 : 0),
      width: v ? v.frameWidth : null,
      height: v ? v.frameHeight : null,
      videoCodec: v && v.codecId && report.get(v.codecId) ? report.get(v.codecId).mimeType : null,
      framesReceived: client.framesReceived,
    };
    prevStats = cur;
    client.lastStats = st;

    $("s-fps").textContent = fmt(st.videoFps, 1);
    $("s-kbps").textContent = fmt(st.videoKbps, 0, " kb/s");
    $("s-jbv").textContent = fmt(st.videoJitterBufferMs, 0, " ms");
    $("s-jba").textContent = fmt(st.audioJitterBufferMs, 0, " ms");
    $("s-rtt").textContent = fmt(st.rttMs, 1, " ms");
    $("s-drop").textContent = st.framesDropped == null ? "–" : String(st.framesDropped);
    $("s-frames").textContent = String(client.framesReceived);
    $("s-audio").textContent = `${fmt(st.audioKbps)} / ${fmt(st.sentAudioKbps)} kb/s`;
    $("s-res").textContent = st.width
      ? `${st.width}×${st.height}${st.videoCodec ? " " + st.videoCodec.replace("video/", "") : ""}`
      : "–";
  }

  // ---- microphone and file -----------------------------------------------------------------
  async function setMic(on) {
    client.micOn = on;
    refreshButtons();
    if (on && pc) await openMic();
    if (!on) closeMic();
    await updateSender();
    log(`mic ${on ? "on" : "off"}`);
  }

  $("mic").onclick = () => setMic(!client.micOn);

  async function loadFile(file) {
    $("file-status").textContent = "decoding…";
    try {
      fileBuffer = await audio().decodeAudioData(await file.arrayBuffer());
      $("file-status").textContent = `${file.name}: ${fileBuffer.duration.toFixed(1)} s`;
    } catch (e) {
      fileBuffer = null;
      $("file-status").textContent = "";
      fail(`cannot decode ${file.name}: ${e.message || e}`);
    }
    refreshButtons();
  }

  // Speak the decoded file: it is played into `genDest`, whose track replaces the mic on the
  // audio sender until the file ends (or Interrupt), then the mic (or silence) returns.
  async function playFile() {
    if (!pc || !fileBuffer) return;
    stopFile();
    const src = audio().createBufferSource();
    src.buffer = fileBuffer;
    src.connect(genDest);
    const meter = ctx.createAnalyser();
    meter.fftSize = 2048;
    src.connect(meter);
    analysers.file = { src, node: meter, buf: new Float32Array(meter.fftSize) };
    if (!levelTimer) levelTimer = setInterval(sampleLevels, 100);
    fileSource = src;
    src.onended = () => {
      if (fileSource !== src) return;
      fileSource = null;
      log("file finished");
      updateSender();
    };
    await updateSender();
    src.start();
    log(`speaking file (${fileBuffer.duration.toFixed(1)} s)`);
  }

  function stopFile() {
    if (!fileSource) return;
    const src = fileSource;
    fileSource = null;
    try { src.stop(); } catch { /* already stopped */ }
    src.disconnect();
    updateSender();
  }

  $("file").onchange = async (ev) => {
    const file = ev.target.files[0];
    if (!file) return;
    await loadFile(file);
    if (pc && fileBuffer) playFile(); // choosing a file while connected speaks it
  };
  $("play-file").onclick = () => playFile();

  // ---- avatars: gallery, ranking photos, upload, delete ----------------------------------
  const MAX_RANK_PHOTOS = 20; // the server ranks at most this many in one request

  function avatarStatus(text, cls = "") {
    const el = $("avatar-status");
    el.textContent = text;
    el.className = cls || "muted";
  }

  async function apiJson(url, options = {}) {
    const r = await fetch(url, { ...options, headers: keyHeaders(options.headers || {}) });
    const body = await r.json().catch(() => ({}));
    if (!r.ok) {
      const err = new Error(body.error || `HTTP ${r.status}`);
      err.status = r.status;
      throw err;
    }
    return body;
  }

  // The preview <img>: a plain URL, or with an API key (an <img> sends no header) the bytes
  // fetched with it, so the key never appears in a URL (their object URLs are freed when
  // the gallery is drawn again).
  let previewUrls = [];
  async function showPreview(img, info) {
    const url = `/v1/avatars/${encodeURIComponent(info.id)}/preview.png?v=${info.created || 0}`;
    if (!apiKey) {
      img.src = url;
      return;
    }
    try {
      const r = await fetch(url, { headers: keyHeaders() });
      if (r.ok) {
        const u = URL.createObjectURL(await r.blob());
        previewUrls.push(u);
        img.src = u;
      }
    } catch { /* the card shows its name without a picture */ }
  }

  async function refreshAvatars() {
    try {
      client.avatars = (await apiJson("/v1/avatars")).avatars || [];
    } catch (e) {
      avatarStatus(`cannot list avatars: ${e.message}`, "error");
      return client.avatars;
    }
    renderGallery();
    if (!client.avatars.some((a) => a.id === client.avatar)) {
      avatarStatus(`avatar "${client.avatar}" is not on this server`, "error");
    }
    return client.avatars;
  }

  function renderGallery() {
    const list = $("gallery");
    list.textContent = "";
    for (const u of previewUrls) URL.revokeObjectURL(u);
    previewUrls = [];
    for (const info of client.avatars) {
      const li = document.createElement("li");
      li.className = "avatar-card";
      li.dataset.id = info.id;
      const pick = document.createElement("button");
      pick.className = "pick";
      pick.setAttribute("aria-pressed", String(info.id === client.avatar));
      pick.title = `animate ${info.id}`;
      const img = document.createElement("img");
      img.alt = `avatar ${info.id}`;
      img.width = img.height = 96;
      showPreview(img, info);
      const name = document.createElement("span");
      name.className = "avatar-name";
      name.textContent = info.id;
      pick.append(img, name);
      if (info.quality) {
        const score = document.createElement("span");
        score.className = `score ${scoreClass(info.quality.score)}`;
        score.textContent = Math.round(info.quality.score);
        score.title = info.quality.notes.length ? info.quality.notes.join("; ") : "reference score";
        pick.append(score);
      }
      pick.onclick = () => selectAvatar(info.id);
      li.append(pick);
      if (info.id !== "default") {
        const del = document.createElement("button");
        del.className = "delete small";
        del.textContent = "Delete";
        del.setAttribute("aria-label", `delete avatar ${info.id}`);
        // two clicks: the first asks, the second (within 4 s) deletes
        del.onclick = () => {
          if (del.dataset.armed) return deleteAvatar(info.id);
          del.dataset.armed = "1";
          del.textContent = "Delete?";
          setTimeout(() => { delete del.dataset.armed; del.textContent = "Delete"; }, 4000);
        };
        li.append(del);
      }
      list.append(li);
    }
  }

  // The avatar the next session animates; kept in the address (?avatar=ID). A live session
  // is restarted with it, since a session's face is fixed when it starts.
  async function selectAvatar(id) {
    const changed = id !== client.avatar;
    client.avatar = id;
    const url = new URL(location.href);
    if (id === "default") url.searchParams.delete("avatar");
    else url.searchParams.set("avatar", id);
    history.replaceState(null, "", url);
    for (const b of document.querySelectorAll("#gallery .pick")) {
      b.setAttribute("aria-pressed", String(b.parentElement.dataset.id === id));
    }
    avatarStatus(`avatar: ${id}`);
    if (changed && pc) {
      log(`switching to avatar ${id}`);
      await disconnect();
      await connect();
    }
  }

  async function deleteAvatar(id) {
    try {
      const r = await fetch(`/v1/avatars/${encodeURIComponent(id)}`, {
        method: "DELETE",
        headers: keyHeaders(),
      });
      if (!r.ok && r.status !== 404) {
        const body = await r.json().catch(() => ({}));
        throw new Error(body.error || `HTTP ${r.status}`);
      }
      avatarStatus(`deleted ${id}`);
    } catch (e) {
      avatarStatus(`cannot delete ${id}: ${e.message}`, "error");
    }
    if (client.avatar === id) await selectAvatar("default");
    await refreshAvatars();
  }

  const scoreClass = (s) => (s >= 70 ? "good" : s >= 40 ? "fair" : "poor");

  // Score photos as references on the server, the best first, and list them with why.
  async function rankPhotos(files) {
    files = [...files];
    if (!files.length) return null;
    if (files.length > MAX_RANK_PHOTOS) {
      avatarStatus(`${files.length} photos: scoring the first ${MAX_RANK_PHOTOS}`);
      files = files.slice(0, MAX_RANK_PHOTOS);
    } else {
      avatarStatus(`scoring ${files.length} photo${files.length > 1 ? "s" : ""}…`);
    }
    const form = new FormData();
    for (const f of files) form.append("image", f, f.name);
    $("photos").disabled = true;
    try {
      client.ranking = await apiJson("/v1/avatars/rank", { method: "POST", body: form });
    } catch (e) {
      avatarStatus(`cannot score the photos: ${e.message}`, "error");
      return null;
    } finally {
      $("photos").disabled = false;
    }
    renderRanking(client.ranking, files);
    const best = client.ranking.recommended;
    avatarStatus(best ? `recommended: ${best}` : "none of these photos can be animated",
      best ? "" : "error");
    return client.ranking;
  }

  const PART_NAMES = {
    size: "face size", frontal: "frontal", sharp: "sharp", exposure: "exposure",
    eyes: "eyes open", mouth: "mouth closed", centred: "room around",
  };

  let thumbUrls = [];
  // each row names its file by its place in the request: two files may share a name
  function renderRanking(result, files) {
    for (const u of thumbUrls) URL.revokeObjectURL(u);
    thumbUrls = [];
    const list = $("ranking");
    list.textContent = "";
    list.hidden = false;
    for (const s of result.ranking) {
      const li = document.createElement("li");
      li.className = "rank-row";
      li.dataset.name = s.name;
      li.dataset.score = s.score;
      if (s.reason) li.dataset.reason = s.reason;
      const file = files[s.index];
      const img = document.createElement("img");
      img.className = "thumb";
      img.alt = "";
      img.width = img.height = 64;
      if (file && s.reason !== "not_image") {
        const u = URL.createObjectURL(file);
        thumbUrls.push(u);
        img.src = u;
        img.onerror = () => img.classList.add("broken");
      } else img.classList.add("broken");

      const body = document.createElement("div");
      body.className = "rank-body";
      const head = document.createElement("div");
      const name = document.createElement("span");
      name.className = "rank-name";
      name.textContent = s.name;
      const score = document.createElement("span");
      score.className = `score ${scoreClass(s.score)}`;
      score.textContent = s.score.toFixed(0);
      head.append(name, " ", score);
      const recommended = s.index === result.recommended_index;
      if (recommended) {
        const rec = document.createElement("span");
        rec.className = "badge";
        rec.textContent = "recommended";
        head.append(" ", rec);
      }
      const reasons = document.createElement("ul");
      reasons.className = "reasons";
      const why = s.problem ? [s.problem] : s.notes;
      for (const text of why.length ? why : ["no problems found"]) {
        const item = document.createElement("li");
        item.textContent = text;
        if (!why.length) item.className = "fine";
        reasons.append(item);
      }
      body.append(head, reasons);
      if (Object.keys(s.parts).length) {
        const parts = document.createElement("p");
        parts.className = "parts muted";
        parts.textContent = Object.entries(s.parts)
          .map(([k, v]) => `${PART_NAMES[k] || k} ${Math.round(v * 100)}%`).join(" · ");
        body.append(parts);
      }
      li.append(img, body);
      if (s.score > 0 && file) {
        const use = document.createElement("button");
        use.className = recommended ? "use primary" : "use";
        use.textContent = "Use";
        use.setAttribute("aria-label", `use ${s.name} as the avatar`);
        use.onclick = () => usePhoto(file, use);
        li.append(use);
      }
      list.append(li);
    }
  }

  // Upload the photo as an avatar (id from its file name, or from its content when that
  // name holds another photo already) and pick it.
  async function usePhoto(file, button) {
    if (button) button.disabled = true;
    avatarStatus(`adding ${file.name}…`);
    const upload = (id) => {
      const form = new FormData();
      form.append("image", file, file.name);
      if (id) form.append("id", id);
      return apiJson("/v1/avatars", { method: "POST", body: form });
    };
    const stem = file.name.replace(/\.[^.]*$/, "");
    try {
      let info;
      try {
        info = await upload(stem);
      } catch (e) {
        if (e.status !== 409) throw e;
        info = await upload(null);
      }
      await refreshAvatars();
      await selectAvatar(info.id);
      return info;
    } catch (e) {
      avatarStatus(`cannot add ${file.name}: ${e.message}`, "error");
      return null;
    } finally {
      if (button) button.disabled = false;
    }
  }

  $("photos").onchange = async (ev) => {
    await rankPhotos(ev.target.files);
    ev.target.value = ""; // choosing the same files again ranks them again
  };
  const zone = $("dropzone");
  let dragDepth = 0; // enter/leave also fire for the zone's children: count, don't flicker
  zone.addEventListener("dragenter", (ev) => {
    ev.preventDefault();
    dragDepth++;
    zone.classList.add("over");
  });
  zone.addEventListener("dragover", (ev) => {
    ev.preventDefault();
    ev.dataTransfer.dropEffect = "copy";
  });
  zone.addEventListener("dragleave", () => {
    dragDepth = Math.max(0, dragDepth - 1);
    if (!dragDepth) zone.classList.remove("over");
  });
  zone.addEventListener("drop", (ev) => {
    ev.preventDefault();
    dragDepth = 0;
    zone.classList.remove("over");
    rankPhotos(ev.dataTransfer.files);
  });
  // A photo dropped anywhere else must not make the browser leave the page to show it.
  for (const type of ["dragover", "drop"]) {
    window.addEventListener(type, (ev) => ev.preventDefault());
  }

  // ---- buttons and start-up ----------------------------------------------------------------
  $("connect").onclick = () => connect();
  $("disconnect").onclick = () => disconnect();
  $("interrupt").onclick = () => interrupt();
  $("clear-log").onclick = () => { $("log").textContent = ""; };

  refreshButtons();
  refreshAvatars();
  if (params.get("autoconnect") === "1") connect();
})();
