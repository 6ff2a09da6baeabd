// Test driver of tests/android_demo/test_session_jvm.py: runs one CosmoesSession scenario on the host JVM and prints
// its outcome as one JSON line (a CosmoesException as {"error", "status"}).
package org.cosmoes.testing

import java.io.FileDescriptor
import java.io.FileOutputStream
import java.io.PrintStream
import kotlinx.coroutines.flow.first
import kotlinx.coroutines.flow.toList
import kotlinx.coroutines.runBlocking
import org.cosmoes.BenchRun
import org.cosmoes.CosmoesException
import org.cosmoes.CosmoesSession
import org.cosmoes.GenerationParams
import org.cosmoes.SessionOptions
import org.json.JSONArray
import org.json.JSONObject

fun main(args: Array<String>) {
    val out = PrintStream(FileOutputStream(FileDescriptor.out), true, "UTF-8")  // the locale's charset may be ASCII
    val result = try {
        runBlocking { scenario(args.toList()) }
    } catch (e: CosmoesException) {
        JSONObject().put("error", e.message).put("status", e.status)
    }
    out.println(result)
}

private suspend fun open(bundle: String, policy: String) =
    CosmoesSession.open(bundle, SessionOptions(policy, threads = 1))

private suspend fun scenario(args: List<String>): JSONObject = when (args[0]) {
    // generate BUNDLE POLICY N PROMPT: the streamed pieces and the statistics
    "generate" -> open(args[1], args[2]).use { s ->
        val t0 = System.nanoTime()
        val pieces = s.generate(args[4], GenerationParams(maxNewTokens = args[3].toInt())).toList()
        JSONObject().put("pieces", JSONArray(pieces)).put("stats", JSONObject(s.stats.value!!.json))
            .put("wall_ms", (System.nanoTime() - t0) / 1e6).put("version", CosmoesSession.version())
    }
    // ids BUNDLE POLICY N ID,ID,...: generateIds
    "ids" -> open(args[1], args[2]).use { s ->
        val ids = s.generateIds(args[4].split(",").map { it.toInt() }.toIntArray(), GenerationParams(args[3].toInt()))
        JSONObject().put("ids", JSONArray(ids.toList())).put("stats", JSONObject(s.stats.value!!.json))
    }
    // open BUNDLE [POLICY]: opening alone (errors come back as {"error", "status"})
    "open" -> open(args[1], args.getOrElse(2) { "swap" }).use { JSONObject().put("opened", true) }
    // cancel BUNDLE POLICY N PROMPT: take the first piece and stop; then the session still generates, and closes twice
    "cancel" -> open(args[1], args[2]).use { s ->
        val params = GenerationParams(maxNewTokens = args[3].toInt())
        val first = s.generate(args[4], params).first()
        val cancelled = s.stats.value!!
        s.reset()
        val again = s.generate(args[4], params).toList()
        s.close()
        val closed = runCatching { s.generateIds(intArrayOf(1), params) }.exceptionOrNull() as CosmoesException
        JSONObject().put("first", first).put("cancelled_tokens", JSONArray(cancelled.tokens))
            .put("cancelled_resident", JSONArray(cancelled.residentPerLayer))
            .put("again", JSONArray(again))
            .put("after_close", JSONObject().put("error", closed.message).put("status", closed.status))
    }
    // extras K=V ...: BenchRun.fromExtras
    "extras" -> BenchRun.fromExtras(args.drop(1).associate { it.substringBefore('=') to it.substringAfter('=') })
        .let { JSONObject().put("request", it.toString()) }
    else -> throw IllegalArgumentException("unknown scenario ${args[0]}")
}
