// The chat screen's state holder: bundle choice, expert policy and memory budget, the streamed generation and its
// statistics, over one CosmoesSession that is reopened when the bundle or the cache settings change.
package org.cosmoes.demo

import android.app.ActivityManager
import android.app.Application
import android.net.Uri
import androidx.lifecycle.AndroidViewModel
import androidx.lifecycle.viewModelScope
import java.io.File
import kotlin.concurrent.thread
import kotlin.time.TimeMark
import kotlin.time.TimeSource
import kotlinx.coroutines.CancellationException
import kotlinx.coroutines.Dispatchers
import kotlinx.coroutines.Job
import kotlinx.coroutines.currentCoroutineContext
import kotlinx.coroutines.delay
import kotlinx.coroutines.flow.MutableStateFlow
import kotlinx.coroutines.flow.StateFlow
import kotlinx.coroutines.flow.asStateFlow
import kotlinx.coroutines.flow.filterNotNull
import kotlinx.coroutines.flow.update
import kotlinx.coroutines.isActive
import kotlinx.coroutines.launch
import kotlinx.coroutines.withContext
import org.cosmoes.CosmoesSession
import org.cosmoes.GenerationParams
import org.cosmoes.SessionOptions

class DemoViewModel(application: Application) : AndroidViewModel(application) {
    private val _state = MutableStateFlow(ChatState())
    val state: StateFlow<ChatState> = _state.asStateFlow()

    // Where bundles are: pushed with adb (the app's external files dir, readable without permissions) and copied
    // from a picked folder (internal storage)
    val pushDir: File? = application.getExternalFilesDir(null)?.resolve("bundles")
    private val importDir: File = application.filesDir.resolve("bundles")

    private var session: CosmoesSession? = null
    private var sessionKey: Pair<String, SessionOptions>? = null
    private var statsJob: Job? = null
    private var generation: Job? = null

    init {
        refreshBundles()
    }

    fun refreshBundles() {
        viewModelScope.launch {
            val found = withContext(Dispatchers.IO) {
                pushDir?.mkdirs()  // so that `adb push` finds the app's own directory
                findBundles(pushDir, importDir)
            }
            _state.update { it.copy(bundles = found) }
            val current = _state.value.bundle
            if (current == null || current !in found) found.firstOrNull()?.let(::selectBundle)
        }
    }

    fun selectBundle(dir: File) {
        viewModelScope.launch {
            val info = withContext(Dispatchers.IO) { BundleInfo.read(dir) }
            _state.update {
                it.copy(bundle = dir, info = info, autoBudgetMb = autoBudgetMb(availMemBytes(), info), output = "",
                    stats = null, liveDecodeTokS = null)
            }
        }
    }

    /** Copies the bundle folder picked with ACTION_OPEN_DOCUMENT_TREE into internal storage and selects it. */
    fun importFolder(tree: Uri) {
        if (_state.value.busy != Busy.IDLE) return
        viewModelScope.launch {
            guarded(Busy.IMPORTING) {
                val (dir, found) = withContext(Dispatchers.IO) {
                    importBundle(getApplication<Application>(), tree, importDir) to findBundles(pushDir, importDir)
                }
                _state.update { it.copy(bundles = found) }
                selectBundle(dir)
            }
        }
    }

    fun setPolicy(policy: PolicyKind) = _state.update { it.copy(policy = policy) }
    fun setLruSlots(slots: Int) = _state.update { it.copy(lruSlots = slots.coerceAtLeast(1)) }
    fun setBudget(budget: BudgetKind) = _state.update { it.copy(budget = budget) }
    fun setFixedBudget(text: String) = _state.update { it.copy(fixedBudgetMb = text) }
    fun setMaxNewTokens(n: Int) = _state.update { it.copy(maxNewTokens = n.coerceIn(1, 4096)) }
    fun setPrompt(text: String) = _state.update { it.copy(prompt = text) }
    fun dismissError() = _state.update { it.copy(error = null) }

    fun generate() {
        val s = _state.value
        if (!s.canGenerate) return
        val dir = s.bundle ?: return
        generation = viewModelScope.launch {
            guarded(Busy.OPENING) {
                val open = sessionFor(dir, s.sessionOptions())
                _state.update { it.copy(busy = Busy.GENERATING, output = "", liveDecodeTokS = null) }
                val sampler = launch { sampleRss() }
                try {
                    stream(open, s.prompt, GenerationParams(maxNewTokens = s.maxNewTokens))
                } finally {
                    sampler.cancel()
                }
            }
        }
    }

    /** Stops the running generation at its next token (the library's callback returns non-zero). */
    fun stop() {
        generation?.cancel()
    }

    override fun onCleared() {
        statsJob?.cancel()
        // close() waits for a generation still winding down: never on the main thread
        session?.let { open -> thread(name = "cosmoes-close") { open.close() } }
        session = null
    }

    // Runs [block] showing [busy], turning any failure into the one-line error the screen shows (never a crash).
    private suspend fun guarded(busy: Busy, block: suspend () -> Unit) {
        _state.update { it.copy(busy = busy, error = null) }
        try {
            block()
        } catch (e: CancellationException) {
            throw e
        } catch (e: Exception) {
            _state.update { it.copy(error = e.message?.lineSequence()?.firstOrNull() ?: e.javaClass.simpleName) }
        } finally {
            _state.update { it.copy(busy = Busy.IDLE) }
        }
    }

    private suspend fun sessionFor(dir: File, options: SessionOptions): CosmoesSession {
        val key = dir.path to options
        session?.let { if (sessionKey == key) return it }
        closeSession()
        val opened = CosmoesSession.open(dir.path, options)
        session = opened
        sessionKey = key
        statsJob = viewModelScope.launch {
            opened.stats.filterNotNull().collect { stats -> _state.update { it.copy(stats = stats) } }
        }
        return opened
    }

    private suspend fun closeSession() {
        statsJob?.cancel()
        val old = session ?: return
        session = null
        sessionKey = null
        withContext(Dispatchers.IO) { old.close() }
    }

    // Live decode speed: the pieces after the first over the time since the first arrived (the first waits for the
    // prefill). A piece is one token's text, so this is close to the library's decode tok/s, which the statistics
    // give exactly once the generation is done.
    private suspend fun stream(open: CosmoesSession, prompt: String, params: GenerationParams) {
        var first: TimeMark? = null
        var before = 0
        open.generate(prompt, params).collect { piece ->
            val start = first ?: TimeSource.Monotonic.markNow().also { first = it }
            val seconds = start.elapsedNow().inWholeMicroseconds / 1e6
            val rate = if (before > 0 && seconds > 0) before / seconds else null
            before++
            _state.update { it.copy(output = it.output + piece, liveDecodeTokS = rate ?: it.liveDecodeTokS) }
        }
    }

    private suspend fun sampleRss() {
        while (currentCoroutineContext().isActive) {
            val rss = withContext(Dispatchers.IO) { currentRssMb() }
            _state.update { it.copy(rssMb = rss) }
            delay(RSS_PERIOD_MS)
        }
    }

    private fun availMemBytes(): Long {
        val info = ActivityManager.MemoryInfo()
        getApplication<Application>().getSystemService(ActivityManager::class.java).getMemoryInfo(info)
        return info.availMem
    }

    private companion object {
        const val RSS_PERIOD_MS = 500L
    }
}
