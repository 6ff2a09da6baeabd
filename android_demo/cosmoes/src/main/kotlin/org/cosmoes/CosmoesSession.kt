// A bundle opened with libcosmoes, driven from coroutines: one single-thread dispatcher per session.
package org.cosmoes

import java.util.concurrent.Executors
import java.util.concurrent.atomic.AtomicInteger
import java.util.concurrent.locks.ReentrantLock
import kotlin.concurrent.withLock
import kotlinx.coroutines.ExecutorCoroutineDispatcher
import kotlinx.coroutines.NonCancellable
import kotlinx.coroutines.currentCoroutineContext
import kotlinx.coroutines.ensureActive
import kotlinx.coroutines.isActive
import kotlinx.coroutines.asCoroutineDispatcher
import kotlinx.coroutines.channels.Channel
import kotlinx.coroutines.channels.SendChannel
import kotlinx.coroutines.channels.trySendBlocking
import kotlinx.coroutines.flow.Flow
import kotlinx.coroutines.flow.MutableStateFlow
import kotlinx.coroutines.flow.StateFlow
import kotlinx.coroutines.flow.asStateFlow
import kotlinx.coroutines.flow.buffer
import kotlinx.coroutines.flow.channelFlow
import kotlinx.coroutines.withContext

/** One opened bundle. Every native call runs on the session's own thread (a session is used by one thread at a
 *  time, cosmoes.h), so callers on any dispatcher never block each other's sessions. */
class CosmoesSession private constructor(
    @Volatile private var handle: Long,
    private val dispatcher: ExecutorCoroutineDispatcher,
) : AutoCloseable {
    // Held by every native call: close() takes it, so it waits for a running generation and never races one
    private val lock = ReentrantLock()
    @Volatile private var closing = false
    @Volatile private var streaming: SendChannel<String>? = null  // the running generate()'s pieces
    private val _stats = MutableStateFlow<Stats?>(null)

    /** The last generation's statistics; null before the first. */
    val stats: StateFlow<Stats?> = _stats.asStateFlow()

    companion object {
        private val sessions = AtomicInteger()

        /** Opens the bundle on the session's own single-thread dispatcher. Throws CosmoesException. */
        suspend fun open(bundleDir: String, options: SessionOptions = SessionOptions()): CosmoesSession {
            val executor = Executors.newSingleThreadExecutor { r ->
                Thread(r, "cosmoes-session-${sessions.incrementAndGet()}").apply { isDaemon = true }
            }
            val dispatcher = executor.asCoroutineDispatcher()
            try {
                // NonCancellable: a caller cancelled while the bundle opens must not lose the native handle; it is
                // closed below instead.
                val handle = withContext(dispatcher + NonCancellable) {
                    Native.open(utf8(bundleDir), utf8(options.toJson()))
                }
                if (!currentCoroutineContext().isActive) {
                    withContext(dispatcher + NonCancellable) { Native.close(handle) }
                    currentCoroutineContext().ensureActive()
                }
                return CosmoesSession(handle, dispatcher)
            } catch (e: Throwable) {
                dispatcher.close()
                throw e
            }
        }

        /** The native library's version, e.g. "0.1.0". */
        fun version(): String = Native.version()

        private fun utf8(text: String) = text.toByteArray(Charsets.UTF_8)
    }

    /** The continuation of [prompt] as text pieces, streamed as they are decoded. Cold: each collection runs one
     *  generation on the session's thread; cancelling the collector stops it at the next token. */
    fun generate(prompt: String, params: GenerationParams = GenerationParams()): Flow<String> = channelFlow {
        ensureOpen()
        val pieces: SendChannel<String> = channel
        withContext(dispatcher) {
            native { h ->
                streaming = pieces
                try {
                    Native.generate(h, utf8(prompt), utf8(params.toJson())) { piece, _ ->
                        // a rendezvous: the send returns once the collector took the piece, and fails once it is
                        // gone (cancelled, or the session closing), so generation stops at the very next token
                        val sent = piece.isEmpty() || pieces.trySendBlocking(piece).isSuccess
                        !sent || closing
                    }
                } finally {
                    streaming = null
                }
                updateStats(h)
            }
        }
    }.buffer(Channel.RENDEZVOUS)

    /** Exactly params.maxNewTokens ids after [promptIds] (no tokenizer, no end-of-text stop). */
    suspend fun generateIds(promptIds: IntArray, params: GenerationParams = GenerationParams()): IntArray {
        ensureOpen()
        return withContext(dispatcher) {
            native { h ->
                Native.generateIds(h, promptIds, utf8(params.toJson()), params.maxNewTokens).also { updateStats(h) }
            }
        }
    }

    /** Forgets the current sequence and the routing history (resident experts stay loaded). */
    suspend fun reset() {
        ensureOpen()
        withContext(dispatcher) { native { h -> Native.reset(h) } }
    }

    /** Stops a running text generation at its next token and waits for it to return, then releases the session.
     *  Idempotent; safe from any thread. */
    override fun close() {
        closing = true
        streaming?.close()  // a generation waiting for a collector that is the one closing would wait forever
        lock.withLock {
            if (handle != 0L) Native.close(handle)
            handle = 0L
        }
        dispatcher.close()
    }

    private fun updateStats(h: Long) {
        _stats.value = Stats.parse(Native.statsJson(h))
    }

    // Checked before dispatching too: a closed session's executor no longer takes work
    private fun ensureOpen() {
        if (handle == 0L) throw CosmoesException("the session is closed", CosmoesException.CLOSED)
    }

    private inline fun <T> native(call: (Long) -> T): T = lock.withLock {
        ensureOpen()
        call(handle)
    }
}
