// The JVM stand-in for the demo app's BenchActivity, run by tests/fakes/adb for `am start ... .BenchActivity --es K V`:
// the Intent's string extras arrive as K=V arguments and go to the same BenchRun the phone runs.
package org.cosmoes.testing

import java.io.File
import kotlin.system.exitProcess
import org.cosmoes.BenchRun
import org.cosmoes.CosmoesException
import org.json.JSONObject

fun main(args: Array<String>) {
    val extras = args.associate { it.substringBefore('=') to it.substringAfter('=') }
    val request = try {
        BenchRun.fromExtras(extras)
    } catch (e: CosmoesException) {
        // what BenchActivity does too: the harness polls the stats file, so a bad extra is reported there
        extras["stats"]?.let { File(it).writeText(JSONObject().put("error", e.message).toString() + "\n") }
        exitProcess(1)
    }
    val device = mapOf("kind" to "jvm-stand-in", "model" to "host JVM (tests/fakes/adb)",
        "jvm" to "${System.getProperty("java.vm.name")} ${System.getProperty("java.version")}",
        "os" to "${System.getProperty("os.name")} ${System.getProperty("os.arch")}")
    exitProcess(if (BenchRun.run(request.copy(device = device))) 0 else 1)
}
