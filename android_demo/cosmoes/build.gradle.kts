// The Android library module: org.cosmoes (Kotlin, JVM-pure) over libcosmoes_jni, which CMake builds together with
// libcosmoes from ../export against an ExecuTorch installed for Android by export/recipes/android/build_library.sh.
import org.jetbrains.kotlin.gradle.dsl.JvmTarget

plugins {
    alias(libs.plugins.android.library)
    alias(libs.plugins.kotlin.android)
}

// The ExecuTorch version build_library.sh builds when the venv has none: pyproject.toml's pin
val executorchVersion: String =
    rootDir.resolve("../pyproject.toml").readLines()
        .firstNotNullOfOrNull { Regex("\"executorch==([^\"+]+)").find(it)?.groupValues?.get(1) }
        ?: error("no executorch== pin in ../pyproject.toml: set cosmoes.executorchPrefix and cosmoes.tokenizersSourceDir")

// build_library.sh's cache layout: $COSMOES_CACHE (default ~/.cache/cosmoes)/executorch-v<version>/
val executorchCache: String =
    (System.getenv("COSMOES_CACHE") ?: "${System.getProperty("user.home")}/.cache/cosmoes") + "/executorch-v$executorchVersion"

val executorchPrefix: String = providers.gradleProperty("cosmoes.executorchPrefix")
    .getOrElse("$executorchCache/android-arm64-v8a/install")
val tokenizersSourceDir: String = providers.gradleProperty("cosmoes.tokenizersSourceDir")
    .getOrElse("$executorchCache/executorch/extension/llm/tokenizers")

android {
    namespace = "org.cosmoes"
    compileSdk = libs.versions.compileSdk.get().toInt()
    ndkVersion = libs.versions.ndk.get()

    defaultConfig {
        minSdk = libs.versions.minSdk.get().toInt()
        consumerProguardFiles("consumer-rules.pro")
        ndk { abiFilters += "arm64-v8a" }
        externalNativeBuild {
            cmake {
                arguments += listOf(
                    "-DEXECUTORCH_ANDROID_PREFIX=$executorchPrefix",
                    "-DCOSMOES_TOKENIZERS_SOURCE_DIR=$tokenizersSourceDir",
                    // the STL ExecuTorch was built with (build_library.sh): one libc++ per .so, only C crosses them
                    "-DANDROID_STL=c++_static",
                    // 16 KB-page devices (Android 15+) load only libraries whose segments are 16 KB aligned
                    "-DANDROID_SUPPORT_FLEXIBLE_PAGE_SIZES=ON",
                    "-DCMAKE_POLICY_VERSION_MINIMUM=3.5",
                )
                // the JNI shim and the library it links: both go into the APK
                targets += listOf("cosmoes_jni", "cosmoes")
            }
        }
    }

    externalNativeBuild {
        cmake {
            path = file("src/main/cpp/CMakeLists.txt")
            version = libs.versions.cmake.get()
        }
    }

    buildTypes {
        release {
            isMinifyEnabled = false
        }
    }

    compileOptions {
        sourceCompatibility = JavaVersion.VERSION_17
        targetCompatibility = JavaVersion.VERSION_17
    }
}

kotlin {
    compilerOptions { jvmTarget.set(JvmTarget.JVM_17) }
}

dependencies {
    // Flow and StateFlow are part of the module's API (CosmoesSession.generate, .stats)
    api(libs.kotlinx.coroutines.android)
}
