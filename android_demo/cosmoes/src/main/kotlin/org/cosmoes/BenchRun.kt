// The headless benchmark of the demo app (BenchActivity on a phone, a JVM stand-in in the tests): bundle + prompt in,
// the statistics JSON `cosmoes bench` reads out.
package org.cosmoes

import java.io.File
import java.nio.file.Files
import java.nio.file.StandardCopyOption
import kotlinx.coroutines.flow.collect
import kotlinx.coroutines.runBlocking
import org.json.JSONArray
import org.json.JSONObject

/** Opens the bundle with the given options, runs `warmup` + `repeats` generations of `maxNewTokens` from the prompt
 *  file, and writes the statistics JSON (the last generation's, with medians over the repeats like the runner's, plus
 *  "device" as filled by the caller and "client": "android-app") atomically to `statsPath`. On failure it writes
 *  {"error": "<one line>"} there instead and returns false.
 *
 *  The prompt file is either token ids (whitespace- or comma-separated integers: what `cosmoes bench` pushes, run
 *  with generateIds so the app decodes exactly the runner's prompt and length) or text (run with generate). */
object BenchRun {
    data class Request(
        val bundleDir: String,
        val promptPath: String,
        val statsPath: String,
        val policy: String = "swap",
        val budgetMb: Double? = null,
        val threads: Int = 0,
        val maxNewTokens: Int = 32,
        val warmup: Int = 1,
        val repeats: Int = 3,
        val prefetch: Boolean = false,
        val device: Map<String, String> = emptyMap(),
    )

    const val CLIENT = "android-app"
    private val KEYS = listOf("bundle", "prompt", "stats", "policy", "budget_mb", "threads", "gen", "warmup", "repeats",
        "prefetch")
    private val IDS = Regex("""\s*\d+(?:[\s,]+\d+)*\s*""")
    private val SEPARATORS = Regex("""[\s,]+""")

    /** The Request an Intent's string extras describe; a missing, unknown or malformed key is a CosmoesException
     *  (status 1) naming it. */
    fun fromExtras(extras: Map<String, String?>): Request {
        extras.keys.firstOrNull { it !in KEYS }?.let { bad(it, "is unknown (known: ${KEYS.joinToString()})") }
        fun text(key: String) = extras[key]?.takeIf { it.isNotEmpty() } ?: bad(key, "is missing")
        fun int(key: String, default: Int, min: Int): Int = extras[key]?.let { v ->
            v.toIntOrNull()?.takeIf { it >= min } ?: bad(key, "must be an integer >= $min, got '$v'")
        } ?: default
        val budget = extras["budget_mb"]?.let { v ->
            v.toDoubleOrNull()?.takeIf { it.isFinite() && it > 0 } ?: bad("budget_mb", "must be a number > 0, got '$v'")
        }
        val prefetch = when (val v = extras["prefetch"]) {
            null, "false" -> false
            "true" -> true
            else -> bad("prefetch", "must be true or false, got '$v'")
        }
        return Request(text("bundle"), text("prompt"), text("stats"), extras["policy"] ?: "swap", budget,
            int("threads", 0, 0), int("gen", 32, 1), int("warmup", 1, 0), int("repeats", 3, 1), prefetch)
    }

    /** Runs the benchmark; true when the statistics were written, false when the error was. */
    fun run(request: Request): Boolean = try {
        writeAtomically(request.statsPath, runBlocking { measure(request) }.toString())
        true
    } catch (e: Exception) {
        val line = (e.message ?: e.javaClass.name).lineSequence().first()
        runCatching { writeAtomically(request.statsPath, JSONObject().put("error", line).toString()) }
        false
    }

    private fun bad(key: String, why: String): Nothing =
        throw CosmoesException("extra '$key' $why", CosmoesException.INVALID_ARGUMENT)

    private suspend fun measure(r: Request): JSONObject {
        val file = File(r.promptPath)
        if (!file.isFile) {
            throw CosmoesException("prompt file not found: ${r.promptPath}", CosmoesException.INVALID_ARGUMENT)
        }
        val prompt = file.readText(Charsets.UTF_8)
        val ids = if (IDS.matches(prompt)) prompt.trim().split(SEPARATORS).map { it.toInt() }.toIntArray() else null
        val params = GenerationParams(maxNewTokens = r.maxNewTokens)
        CosmoesSession.open(r.bundleDir, SessionOptions(r.policy, r.budgetMb, r.threads,
            prefetch = r.prefetch)).use { session ->
            suspend fun once(): Stats {
                if (ids != null) session.generateIds(ids, params) else session.generate(prompt, params).collect()
                return session.stats.value!!
            }
            repeat(r.warmup) { once() }
            val runs = List(r.repeats) { once() }
            return summary(runs, r, if (ids != null) "ids" else "text")
        }
    }

    // The last run's statistics with the runner's aggregates: medians of the speeds and of decode loads, sums of the
    // expert traffic over the repeats (the warm-up excluded), so a phone's row reads like a runner's.
    private fun summary(runs: List<Stats>, r: Request, promptKind: String): JSONObject {
        val each = runs.map { JSONObject(it.json) }
        fun median(key: String) = each.map { it.getDouble(key) }.sorted().let { v ->
            if (v.size % 2 == 1) v[v.size / 2] else (v[v.size / 2 - 1] + v[v.size / 2]) / 2
        }
        val loads = each.sumOf { it.getLong("expert_loads") }
        val loadMs = each.sumOf { it.getDouble("expert_load_ms") }
        val evictions = each.sumOf { it.getLong("expert_evictions") }
        val evictMs = each.sumOf { it.getDouble("expert_evict_ms") }
        return each.last()
            .put("ttft_ms", median("ttft_ms")).put("prefill_tok_s", median("prefill_tok_s"))
            .put("decode_tok_s", median("decode_tok_s"))
            .put("decode_tok_s_runs", JSONArray(each.map { it.getDouble("decode_tok_s") }))
            .put("expert_loads_decode", median("expert_loads_decode"))
            .put("expert_loads", loads).put("expert_evictions", evictions)
            .put("expert_load_ms", loadMs).put("expert_load_ms_mean", if (loads > 0) loadMs / loads else 0.0)
            .put("expert_evict_ms", evictMs).put("expert_evict_ms_mean", if (evictions > 0) evictMs / evictions else 0.0)
            .put("warmup", r.warmup).put("repeats", r.repeats).put("client", CLIENT).put("prompt_kind", promptKind)
            .put("device", JSONObject(r.device as Map<*, *>))
    }

    // A reader polling for the file (adb shell) sees nothing or all of it, never a torn write.
    private fun writeAtomically(path: String, text: String) {
        val target = File(path)
        target.absoluteFile.parentFile?.mkdirs()
        val tmp = File(target.absolutePath + ".tmp")
        tmp.writeText(text + "\n", Charsets.UTF_8)
        Files.move(tmp.toPath(), target.toPath(), StandardCopyOption.ATOMIC_MOVE, StandardCopyOption.REPLACE_EXISTING)
    }
}
